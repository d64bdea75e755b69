"""Compile the CPU kernels (`cpu_int8_dot/int8_dot.cc`, `cpu_attention/attention.cc`, `cpu_fwht/fwht.cc`) once per
host into one shared library and register their handlers with XLA as CPU custom calls (`TARGETS`).

The library is built on first use with the host's C++ compiler (`$CXX`, else `c++` / `g++`) against the
XLA FFI headers that ship with jaxlib, into `$SSM_LLM_CACHE/kernels` (default `~/.cache/ssm_llm/kernels`,
the cache the converters use), named by a digest of the source, the flags, the compiler and jaxlib: a new
version builds anew, a built one loads in milliseconds. No compiler, a CPU without AVX2 / FMA, or a failed
build leaves the ops unavailable (`unavailable_reason` says why) and the callers on XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib

TARGET = "ssm_llm_int8_dot"
BLOCKED_TARGET = "ssm_llm_int8_dot_blocked"
ATTENTION_TARGET = "ssm_llm_masked_attention"
FWHT_TARGET = "ssm_llm_fwht"
# XLA custom-call name -> the handler symbol the library exports.
TARGETS = {
    TARGET: "SsmLlmInt8Dot",
    BLOCKED_TARGET: "SsmLlmInt8DotBlocked",
    ATTENTION_TARGET: "SsmLlmMaskedAttention",
    FWHT_TARGET: "SsmLlmFwht",
}
_HERE = Path(__file__).parent
SOURCES = (
    _HERE / "cpu_int8_dot" / "int8_dot.cc",
    _HERE / "cpu_attention" / "attention.cc",
    _HERE / "cpu_fwht" / "fwht.cc",
)
HEADERS = (_HERE / "cpu_workers.h",)  # the helper threads both share
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++20", "-shared", "-fPIC", "-w")
# Added where the CPU has them: one vpdpbusd instead of vpmaddubsw + vpmaddwd + vpaddd.
VNNI_FLAGS = ("-mavx512vnni", "-mavx512vl")
BUILD_TIMEOUT_S = 300
# The instructions the kernels use, as /proc/cpuinfo names them.
NEEDS = ("avx2", "fma")


def kernel_dir() -> Path:
    """Where built libraries live: `$SSM_LLM_CACHE/kernels`, default `~/.cache/ssm_llm/kernels`."""
    root = os.environ.get("SSM_LLM_CACHE") or Path.home() / ".cache" / "ssm_llm"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _check_host() -> str | None:
    """Why this host cannot run the kernels, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are x86-64 AVX2 code; this machine is {platform.machine()}"
    missing = [f for f in NEEDS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler found ($CXX, c++ or g++)"
    return None


def _flags() -> tuple[str, ...]:
    return FLAGS + (VNNI_FLAGS if {"avx512_vnni", "avx512vl"} <= _cpu_flags() else ())


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = "\0".join([*texts, " ".join(_flags()), version, jaxlib.__version__])
    return kernel_dir() / f"libssm_llm_cpu_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile(compiler: str, out: Path, flags: tuple[str, ...] | None = None) -> None:
    """Build the library at `out` with `flags` (default: this host's)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        includes = [f"-I{jax.ffi.include_dir()}", f"-I{_HERE}"]
        cmd = [compiler, *(flags or _flags()), *includes, *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent builder's copy is as good as ours
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def _load() -> str | None:
    """Build (if needed), load and register the kernels once per process; the reason it is unavailable, or None."""
    reason = _check_host()
    if reason:
        return reason
    try:
        compiler = _compiler()
        path = _library_path(compiler)
        if not path.exists():  # once per host and version: say so, it takes a few seconds
            print(f"ssm_llm: building the CPU kernels into {path.parent} (once)", file=sys.stderr, flush=True)
            _compile(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def unavailable_reason() -> str | None:
    """None when the kernels are built and registered on this host (building them on the first call), else why not."""
    return _load()


def available() -> bool:
    """Whether the compiled kernels run here (builds and registers them on the first call)."""
    return _load() is None
