"""What the host CPU offers for fast matmuls: its model name and the instruction-set flags that decide
whether int8 (integer dot products) or bfloat16 products can beat float32 on it.

XLA's CPU backend is only fast at int8 x int8 -> int32 products on CPUs with integer dot-product
instructions (x86: AVX-512 VNNI, AVX-VNNI, AMX; Arm: the dot-product and i8mm extensions); on a plain
AVX2 CPU the same product is emulated. Benchmarks record these flags beside their numbers (the
development machines differ between sessions), and the backend choice of the integer inference path
reads them. Linux reports them in /proc/cpuinfo; elsewhere the flags are unknown (empty).
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "asimddp", "i8mm")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "amx_tile", "asimd", "sve")
_RECORDED = frozenset(INT8_DOT_FLAGS + BF16_FLAGS + SIMD_FLAGS)


@dataclasses.dataclass(frozen=True)
class CPUFeatures:
    """A CPU's model name and the matmul-relevant flags it reports (a subset of its flags)."""

    model: str
    flags: frozenset[str]

    @property
    def int8_dot(self) -> tuple[str, ...]:
        """The integer dot-product extensions present (empty: int8 products are emulated)."""
        return tuple(f for f in INT8_DOT_FLAGS if f in self.flags)

    @property
    def bf16(self) -> tuple[str, ...]:
        """The bfloat16 arithmetic extensions present (empty: bfloat16 is converted to float32)."""
        return tuple(f for f in BF16_FLAGS if f in self.flags)

    def as_json(self) -> dict:
        """A JSON-ready description for benchmark results."""
        return {
            "cpu": self.model,
            "cpu_flags": sorted(self.flags),
            "int8_dot": list(self.int8_dot),
            "bf16": list(self.bf16),
        }


def parse_cpuinfo(text: str) -> CPUFeatures:
    """The first processor's model and recorded flags in the text of a Linux /proc/cpuinfo (x86 "model
    name" / "flags", Arm "Features")."""
    model, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split()) & _RECORDED
    return CPUFeatures(model or platform.processor() or "unknown", flags or frozenset())


def host_cpu() -> CPUFeatures:
    """The CPU this process runs on (flags empty where /proc/cpuinfo does not exist)."""
    path = Path("/proc/cpuinfo")
    return parse_cpuinfo(path.read_text() if path.is_file() else "")
