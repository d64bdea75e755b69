"""A cache of converted models: `converters.load(path, cache=True)` converts a GGUF file or a Hugging Face
directory once, stores the result under `<cache root>/models/`, and later loads with the same options read
it back instead (no dequantizing or re-laying out, no torch).

An entry is keyed by the source's content (`cache_dir.source_digest`), the load options (dtype, quantize,
group_size), `ENTRY_VERSION` and a digest of the code that converts (`code_digest`: a fix to a converter
retires the entries it wrote). A source that changes gets a new key, and the entry of its old content is
removed. An entry is a directory holding `manifest.json` (the config, the tree of params, each leaf's
dtype, shape, offset and CRC-32), `params.bin` (the leaves' bytes, 64-byte aligned) and `meta.json` (the
source and options, for `ssm-llm cache ls`), written in a temporary directory and renamed into place.
Reading maps the file and checks every leaf's CRC-32 (SmolLM2-135M, 538 MB: 0.5 s, against 1.8 s for
the same params as an orbax checkpoint; CRC-32 catches accidental damage, which is what
a user's own cache meets, and costs 0.15 s against 0.37 s for sha256), then the params against the config.
A damaged or unreadable entry is deleted and converted again, never used. Writing is best effort: a cache
that cannot be written costs the conversion, not the load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import secrets
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from converters.cache_dir import cache_root, source_digest
from converters.checkpoint import join_quantized, split_quantized
from ssm_llm.config_io import config_from_dict
from ssm_llm.param_check import check_params

# Bump when the converted layout or this format changes, so older entries are no longer read.
ENTRY_VERSION = 1
MODELS_DIR = "models"
MANIFEST = "manifest.json"
DATA = "params.bin"
META = "meta.json"
ALIGN = 64
STAGING_MAX_AGE = 3600  # seconds after which a leftover temporary directory is swept
# The code a converted model depends on, relative to the repository root: converters, the quantizers and
# the quantized weight layout, and the configs.
CODE = ("converters", "ssm_llm/quant", "pallas_kernels/quantized_matmul", "ssm_llm/config.py", "ssm_llm/config_io.py")


def models_dir() -> Path:
    """Where converted models are cached."""
    return cache_root() / MODELS_DIR


@functools.cache
def code_digest() -> str:
    """sha256 of the sources in CODE (read once per process)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for item in CODE:
        files = [root / item] if item.endswith(".py") else sorted((root / item).rglob("*.py"))
        for file in files:
            digest.update(f"{file.relative_to(root)}\0".encode() + file.read_bytes())
    return digest.hexdigest()


def entry_path(source: Path, options: dict) -> Path:
    """The cache entry of `source` loaded with `options` (a JSON-able dict)."""
    key = {"source": source_digest(source), "options": options, "version": ENTRY_VERSION, "code": code_digest()}
    name = source.resolve().name.lstrip(".") or "model"
    return models_dir() / f"{name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def _warn(message: str) -> None:
    print(f"ssm_llm cache: {message}", file=sys.stderr)


def load_cached(source: Path, options: dict, convert: Callable[[], tuple], background: bool = False) -> tuple:
    """`(config, params)` of `source` from its cache entry, or from `convert()` (then stored as the entry).

    background: store a new entry in a (non-daemon) thread and return at once; the process waits for the
    thread before it exits. For command-line runs, which tokenize and compile meanwhile (the write took
    1-4 s for SmolLM2's 538 MB on the 2-core machine)."""
    entry = entry_path(source, options)
    if entry.exists():
        try:
            return read_entry(entry)
        except (ValueError, OSError) as err:  # damaged, truncated, edited or half-deleted
            _warn(f"entry {entry.name} is damaged ({err}); converting again")
            remove_entry(entry)
    config, params = convert()
    meta = {"source": str(source.resolve()), "options": options, "created": time.time()}
    if background:
        threading.Thread(target=_store, args=(params, config, entry, meta), name="ssm_llm cache write").start()
    else:
        _store(params, config, entry, meta)
    return config, params


def _store(params, config, entry: Path, meta: dict) -> None:
    """Write the entry, then remove the entries of the source's older content (same path and options) and
    leftover temporary directories. Best effort: a failure is a warning (the params are already loaded)."""
    try:
        write_entry(params, config, entry, meta)
        for other in entries(entry.parent):
            if other["path"] != entry and (other["source"], other["options"]) == (meta["source"], meta["options"]):
                remove_entry(other["path"])
        sweep_staging(entry.parent)
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written must not fail the load
        _warn(f"could not write {entry} ({type(err).__name__}: {err}); the next load converts again")


def _skeleton(node, leaves: list):
    """The JSON shape of a params tree (dicts, lists, arrays, None), its arrays appended to `leaves`."""
    if isinstance(node, dict):
        return {"dict": {str(k): _skeleton(v, leaves) for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        return {"list": [_skeleton(v, leaves) for v in node]}
    if node is None:
        return None
    leaves.append(node)
    return {"leaf": len(leaves) - 1}


def _host(leaf) -> np.ndarray:
    """A leaf's bytes on the host. An accelerator array is copied through a throwaway array first:
    `np.asarray` keeps the host copy it makes on the array it was given, for that array's lifetime."""
    if isinstance(leaf, jax.Array) and any(d.platform != "cpu" for d in leaf.devices()):
        leaf = jnp.array(leaf, copy=True)
    return np.ascontiguousarray(np.asarray(leaf))


def _fill(skeleton, arrays: list):
    """Invert `_skeleton`."""
    if skeleton is None:
        return None
    if "dict" in skeleton:
        return {k: _fill(v, arrays) for k, v in skeleton["dict"].items()}
    if "list" in skeleton:
        return [_fill(v, arrays) for v in skeleton["list"]]
    return arrays[skeleton["leaf"]]


def write_entry(params: dict, config, entry: Path, meta: dict) -> None:
    """Store `params` and `config` as the entry `entry` (atomically: a temporary directory renamed into place)."""
    tree, quantized = split_quantized(params)
    leaves: list[np.ndarray] = []
    skeleton = _skeleton(tree, leaves)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{entry.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        records, offset = [], 0
        with open(staging / DATA, "wb") as f:
            for leaf in leaves:  # one leaf on the host at a time
                array = _host(leaf)
                data = array.reshape(-1).view(np.uint8)
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(data.data)
                records.append(
                    {"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset, "crc32": zlib.crc32(data)}
                )
                offset += data.nbytes
        manifest = {
            "version": ENTRY_VERSION,
            "config": config.to_dict(),
            "quantized_weights": quantized,
            "tree": skeleton,
            "leaves": records,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest))
        (staging / META).write_text(json.dumps(meta, indent=1))
        try:
            os.replace(staging, entry)
        except OSError:
            if not (entry / MANIFEST).is_file():
                raise
            # another process put the entry in place first: keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; else a failed write


def read_entry(entry: Path) -> tuple:
    """`(config, params)` of an entry; ValueError or OSError if it is damaged in any way."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest["version"] != ENTRY_VERSION:
            raise ValueError(f"version {manifest['version']!r}")
        config = config_from_dict(manifest["config"])
        with open(entry / DATA, "rb") as f:
            arrays = _read_leaves(f, manifest["leaves"])
        params = join_quantized(_fill(manifest["tree"], arrays), manifest["quantized_weights"], entry)
        check_params(params, config)
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"malformed entry ({type(err).__name__}: {err})") from None
    return config, params


def _read_leaves(f, records: list) -> list:
    """Each leaf of `records` from the mapped file `f`, its CRC-32 checked first. On CPU, `jax.device_put`
    keeps an aligned host array in place rather than copy it (`jnp.asarray` copies: 0.03 s against 0.2 s
    for SmolLM2's 538 MB), so the params stay mapped from the file, which is safe because entries are only
    ever replaced by renaming and deleted by unlinking, never rewritten in place."""
    if not records:
        return []
    data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
    arrays = []
    for i, record in enumerate(records):
        dtype = jnp.dtype(record["dtype"])
        start, size = record["offset"], math.prod(record["shape"]) * dtype.itemsize
        raw = data[start : start + size]
        if start < 0 or raw.size != size:
            raise ValueError(f"leaf {i} of {DATA} lies beyond its end (truncated)")
        if zlib.crc32(raw) != record["crc32"]:
            raise ValueError(f"leaf {i} of {DATA}: its bytes changed (CRC-32 mismatch)")
        arrays.append(jax.device_put(raw.view(dtype).reshape(record["shape"])))
    return arrays


def entries(root: Path | None = None) -> list[dict]:
    """Every cache entry under `root` (default `models_dir()`): {"path", "bytes", "source", "options",
    "created"} (the last three None when its description is missing)."""
    root = models_dir() if root is None else root
    if not root.is_dir():
        return []
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = json.loads((path / META).read_text())
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        except (OSError, ValueError):  # being written or removed by another process, or damaged
            meta, size = {}, 0
        found.append({"path": path, "bytes": size, **{k: meta.get(k) for k in ("source", "options", "created")}})
    return found


def remove_entry(path: Path) -> None:
    """Delete one entry: renamed out of the way first, so no reader meets it half deleted."""
    doomed = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"  # swept later if rmtree fails
    try:
        os.replace(path, doomed)
    except OSError:  # already gone
        return
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_staging(root: Path, max_age: float = STAGING_MAX_AGE) -> None:
    """Delete temporary directories under `root` older than `max_age` seconds (left by an interrupted write)."""
    for path in root.glob(".*.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > max_age:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def clear() -> tuple[int, int]:
    """Delete every cached model (not the tokenizers or compiled programs) -> (entries removed, bytes freed)."""
    found = entries()
    for entry in found:
        remove_entry(entry["path"])
    if models_dir().is_dir():
        sweep_staging(models_dir(), max_age=0)
    return len(found), sum(e["bytes"] for e in found)
