"""GPU-specific parameters of every Pallas kernel, in one place.

The kernels are written for the Pallas Triton lowering (runs on Ampere and Hopper). JAX now defaults
to Mosaic GPU and has deprecated Triton; a Mosaic GPU variant of a kernel would add its own entry
here (and its own lowering choice in `compiler_params`) without touching the kernel modules' maths.
Block-size choices that are only about speed on a GPU live here too.
"""

from __future__ import annotations

import jax

# Triton launch parameters per kernel name (as passed to `resolve_impl`).
TRITON_PARAMS: dict[str, dict[str, int]] = {
    "ssd_step": dict(num_warps=4, num_stages=1),
    "selective_state_update": dict(num_warps=4, num_stages=1),
}

# Channels per program in the Mamba-1 state update (a power of two; Triton blocks must be).
SELECTIVE_STATE_UPDATE_BLOCK = 64


def compiler_params(kernel: str, interpret: bool):
    """The `compiler_params` for `pallas_call` of `kernel`: Triton's when compiling (which also selects
    the Triton lowering over Mosaic GPU, even when lowering for CUDA from a CPU-only machine), none
    when interpreting."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(**TRITON_PARAMS[kernel])


def is_power_of_two(n: int) -> bool:
    """Triton needs every block dimension to be a power of two."""
    return n > 0 and n & (n - 1) == 0
