"""Mamba-1 selective scan (prefill) and its single-step state update (decode).

Per channel d and state index n, with a discretised time step dt_t (already softplus'ed):
    h_t = exp(dt_t[d] * A[d, n]) * h_{t-1} + dt_t[d] * B_t[n] * x_t[d]
    y_t[d] = sum_n C_t[n] * h_t[d, n] + D[d] * x_t[d],   then y_t *= silu(z_t) if z is given.
A step with dt = 0 leaves the state unchanged, which is how right-padded steps are masked.

The reference (`reference.py`) splits time into chunks: a `lax.scan` over chunks carries the state, and
inside a chunk a `lax.associative_scan` computes all its states at once. Memory is O(chunk * D * N), not
O(T * D * N), and the sequential depth is T / chunk.

The Pallas scans (`triton.py` for GPU, `tpu.py` for Mosaic TPU) walk time step by step instead (the
Mamba CUDA kernel's idea), with each program's [channels, N] state on chip, loading their inputs a
chunk of steps at a time.
"""

from __future__ import annotations

import jax

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.lowering import is_power_of_two
from pallas_kernels.selective_scan.reference import DEFAULT_CHUNK, selective_scan_ref, selective_state_update_ref
from pallas_kernels.selective_scan.tpu import (
    SelectiveScanTPUBlockSizes,
    SelectiveStateUpdateTPUBlockSizes,
    selective_scan_pallas_tpu,
    selective_state_update_pallas_tpu,
)
from pallas_kernels.selective_scan.triton import (
    SelectiveScanBlockSizes,
    SelectiveStateUpdateBlockSizes,
    selective_scan_pallas,
    selective_state_update_pallas,
)

__all__ = [
    "DEFAULT_CHUNK",
    "SelectiveScanBlockSizes",
    "SelectiveScanTPUBlockSizes",
    "SelectiveStateUpdateBlockSizes",
    "SelectiveStateUpdateTPUBlockSizes",
    "selective_scan",
    "selective_scan_pallas",
    "selective_scan_pallas_tpu",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_pallas",
    "selective_state_update_pallas_tpu",
    "selective_state_update_ref",
]

SCAN_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
UPDATE_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")


def selective_scan(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    state=None,
    *,
    block_sizes: SelectiveScanBlockSizes | SelectiveScanTPUBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `selective_scan_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    On TPU "pallas" runs `selective_scan_pallas_tpu`. Both Pallas kernels take every size, so there is no
    fallback by shape. `block_sizes` are those of the kernel that runs (None: its defaults)."""
    kind = resolve_impl(impl, "selective_scan", SCAN_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return selective_scan_pallas_tpu(x, dt, A, B, C, D, z, state, block_sizes=block_sizes)
    if kind == "xla":
        return selective_scan_ref(x, dt, A, B, C, D, z, state)
    return selective_scan_pallas(x, dt, A, B, C, D, z, state, block_sizes=block_sizes, interpret=kind == "interpret")


def selective_state_update(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    *,
    block_sizes: SelectiveStateUpdateBlockSizes | SelectiveStateUpdateTPUBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `selective_state_update_ref`'s contract (see there). On TPU "pallas" runs
    `selective_state_update_pallas_tpu` (any sizes). The compiled GPU (Triton) kernel needs a power-of-two
    state_size: otherwise "auto" falls back to the reference and "pallas" raises. `block_sizes` are those
    of the kernel that runs (None: its defaults)."""
    kind = resolve_impl(impl, "selective_state_update", UPDATE_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return selective_state_update_pallas_tpu(state, x, dt, A, B, C, D, z, block_sizes=block_sizes)
    if kind == "pallas" and not is_power_of_two(state.shape[2]):
        if impl != "auto":
            raise ValueError(
                f"selective_state_update: the Pallas GPU kernel needs a power-of-two state_size, "
                f"got {state.shape[2]}; use impl='xla'"
            )
        kind = "xla"
    if kind == "xla":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z)
    return selective_state_update_pallas(
        state, x, dt, A, B, C, D, z, block_sizes=block_sizes, interpret=kind == "interpret"
    )
