"""Mamba-2 state-space duality (SSD): the chunked scan (prefill) and its single-step update (decode).

Per head h (scalar A[h] < 0), head channel p and state index n, with dt_t[h] already softplus'ed:
    S_t[h] = exp(dt_t[h] * A[h]) * S_{t-1}[h] + dt_t[h] * x_t[h] (outer) B_t[g(h)]
    y_t[h] = S_t[h] @ C_t[g(h)] + D[h] * x_t[h]
where the G groups of B/C are shared by H / G consecutive heads. A step with dt = 0 leaves the
state unchanged (how right-padded steps are masked).

The chunked reference (`reference.py`) is the SSD "segsum" formulation: inside each chunk of L steps
the output is an attention-like product (C B^T masked by the decays exp(segsum(dt A))) plus the
entering state read out by C, and the chunk's end state is contracted from B, x and the decays to the
chunk's end; a `lax.scan` over chunks passes states between them, so time grows linearly with T and
intermediates stay chunk-sized. B and C are never repeated per head.

The Pallas kernel (`triton.py`) fuses the four Mamba-2 GPU passes (chunk cumsum, chunk state, state
passing, chunk scan) into one: each program owns one (sequence, head, block of head channels) and walks
the chunks in order with its state on chip, so the state never goes through memory between chunks.
`tpu.py` holds the Mosaic TPU variants.
"""

from __future__ import annotations

import jax

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.lowering import is_power_of_two
from pallas_kernels.ssd.reference import segsum, ssd_chunked_ref, ssd_step_ref
from pallas_kernels.ssd.tpu import SSDChunkedTPUBlockSizes, ssd_chunked_pallas_tpu, ssd_step_pallas_tpu
from pallas_kernels.ssd.triton import SSDChunkedBlockSizes, ssd_chunked_pallas, ssd_step_pallas

__all__ = [
    "SSDChunkedBlockSizes",
    "SSDChunkedTPUBlockSizes",
    "segsum",
    "ssd_chunked",
    "ssd_chunked_pallas",
    "ssd_chunked_pallas_tpu",
    "ssd_chunked_ref",
    "ssd_step",
    "ssd_step_pallas",
    "ssd_step_pallas_tpu",
    "ssd_step_ref",
]

CHUNKED_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
STEP_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")


def ssd_chunked(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    state=None,
    chunk_size: int = 256,
    *,
    block_sizes: SSDChunkedBlockSizes | SSDChunkedTPUBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `ssd_chunked_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    The Pallas kernels take any sizes and ignore `chunk_size` beyond validating it (see `ssd_chunked_pallas`);
    on TPU "pallas" runs `ssd_chunked_pallas_tpu`. `block_sizes` are those of the kernel that runs
    (None: its defaults; the reference has none)."""
    kind = resolve_impl(impl, "ssd_chunked", CHUNKED_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return ssd_chunked_pallas_tpu(x, dt, A, B, C, D, state, chunk_size, block_sizes=block_sizes)
    if kind == "xla":
        return ssd_chunked_ref(x, dt, A, B, C, D, state, chunk_size)
    return ssd_chunked_pallas(
        x, dt, A, B, C, D, state, chunk_size, block_sizes=block_sizes, interpret=kind == "interpret"
    )


def ssd_step(state, x, dt, A, B, C, D=None, *, impl="auto"):
    """Dispatcher for `ssd_step_ref`'s contract (see there). On TPU "pallas" runs `ssd_step_pallas_tpu` (any
    sizes). The compiled GPU (Triton) kernel needs head_dim and state_size to be powers of two: otherwise
    "auto" falls back to the reference and "pallas" raises. The kernels have no block sizes: one program
    per (sequence, head)."""
    kind = resolve_impl(impl, "ssd_step", STEP_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return ssd_step_pallas_tpu(state, x, dt, A, B, C, D)
    if kind == "pallas" and not (is_power_of_two(state.shape[2]) and is_power_of_two(state.shape[3])):
        if impl != "auto":
            raise ValueError(
                f"ssd_step: the Pallas GPU kernel needs power-of-two head_dim and state_size, got "
                f"{state.shape[2]} and {state.shape[3]}; use impl='xla'"
            )
        kind = "xla"
    if kind == "xla":
        return ssd_step_ref(state, x, dt, A, B, C, D)
    return ssd_step_pallas(state, x, dt, A, B, C, D, interpret=kind == "interpret")
