"""Up-front memory checks: before allocating a cache, an output buffer or a draft tree, compare its size
with the memory the device has free, so a mistaken option fails at once with an error that names it
and the bytes it would need, instead of an allocator's "out of memory" deep inside XLA (or a machine
that swaps for minutes).
"""

from __future__ import annotations

import jax


def format_bytes(n: float) -> str:
    """`n` bytes in the largest unit that keeps the number >= 1 (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory of `device` (default: the first device): GPU/TPU allocator headroom, or the host's
    MemAvailable for the CPU backend. None where it cannot be known."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return _host_available()
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(what: str, needed: int, device: jax.Device | None = None) -> None:
    """Raise MemoryError naming `what` (the option or object responsible) unless `needed` bytes fit in
    the free memory of `device`. Unknown free memory: no check."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise MemoryError(
            f"{what} would need {format_bytes(needed)}, more than the {format_bytes(free)} "
            f"free on {(device or jax.devices()[0]).platform}"
        )
