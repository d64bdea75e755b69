"""How each kernel's `pallas_call` is lowered: Triton (GPU) or Mosaic TPU compiler parameters, the TPU
interpreter, and the block-shape rules of each lowering.

The GPU kernels are written for the Pallas Triton lowering (runs on Ampere and Hopper). JAX now
defaults to Mosaic GPU and has deprecated Triton; a Mosaic GPU variant of a kernel would add its own
lowering choice here without touching the kernels' maths. Where the Triton kernel cannot lower on TPU,
a `pltpu` (Mosaic TPU) variant `<name>_pallas_tpu` sits beside it. Speed-only block sizes are each
kernel's `block_sizes` argument (see `pallas_kernels.block_sizes`).
"""

from __future__ import annotations

import jax.numpy as jnp


def triton_params(interpret: bool, num_warps: int, num_stages: int):
    """The `compiler_params` for a GPU kernel's `pallas_call`: Triton's when compiling (which also selects
    the Triton lowering over Mosaic GPU, even when lowering for CUDA from a CPU-only machine), none
    when interpreting."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def is_power_of_two(n: int) -> bool:
    """Triton needs every block dimension to be a power of two."""
    return n > 0 and n & (n - 1) == 0


def tpu_params(dimension_semantics: tuple[str, ...], interpret: bool):
    """The `compiler_params` for a TPU variant's `pallas_call` ("parallel" grid axes are independent,
    "arbitrary" ones run in order and may carry scratch); none when interpreting."""
    if interpret:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def tpu_interpret(interpret: bool):
    """The `interpret` argument of a TPU variant's `pallas_call`: the TPU interpreter (which models
    TPU memory spaces and semantics on CPU) when interpreting, else compile with Mosaic."""
    if not interpret:
        return False
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def tpu_row_block(rows: int, cap: int, *dtypes) -> int:
    """A block of rows for a second-to-last block dim: `rows` itself when it is at most `cap`, else the
    largest multiple of the dtypes' sublane tile (8 rows for 32-bit, 16 for 16-bit, 32 for 8-bit) that
    divides `rows` and is at most `cap`, else `rows` (a full-dimension block is always allowed)."""
    if rows <= cap:
        return rows
    tile = 32 // min(jnp.dtype(d).itemsize for d in dtypes)
    return next((block for block in range(cap - cap % tile, 0, -tile) if rows % block == 0), rows)
