"""TPU-specific parameters of the Pallas kernels' `pltpu` (Mosaic TPU) variants, in one place.

A kernel whose GPU (Triton) version cannot lower on TPU gets a TPU variant beside it in its module
(`<name>_pallas_tpu`); its launch parameters and speed-only block sizes live here.
"""

from __future__ import annotations

import jax.numpy as jnp

# Mosaic compiler parameters per kernel name (as passed to `resolve_impl`).
TPU_PARAMS: dict[str, dict] = {
    # Decode steps: (sequence, head) and (sequence, channel block) programs are independent.
    "ssd_step": dict(dimension_semantics=("parallel", "parallel")),
    "selective_state_update": dict(dimension_semantics=("parallel", "parallel")),
    "causal_conv1d_update": dict(dimension_semantics=("parallel", "parallel")),
    # (batch, head, query block, key block): the key axis carries the online softmax in scratch.
    "flash_attention": dict(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    # (sequence, kv head, row block, key block): the key axis carries the online softmax in scratch.
    "cache_attention": dict(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    # (sequence, channel block, time block): each time block reads its own halo rows, nothing is carried.
    "causal_conv1d": dict(dimension_semantics=("parallel", "parallel", "parallel")),
    # The cache_attention kernel with a draft-tree mask (its blocks are CACHE_ATTENTION_TPU too).
    "tree_attention": dict(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    # (sequence, head, chunk): the chunk axis carries the SSD state in scratch.
    "ssd_chunked": dict(dimension_semantics=("parallel", "parallel", "arbitrary")),
    # (sequence, channel block, time chunk): the time axis carries the Mamba-1 state in scratch.
    "selective_scan": dict(dimension_semantics=("parallel", "parallel", "arbitrary")),
    # (row block, column block, K block): the K axis carries the float32 accumulator in scratch.
    "quantized_matmul": dict(dimension_semantics=("parallel", "parallel", "arbitrary")),
}

# flash_attention: query and key block (rows of T); a multiple of 16 (bf16 sublane tile).
FLASH_ATTENTION_TPU_BLOCK = 128

# cache_attention: keys per K/V block (a multiple of 128; 32 for int8) and most query rows (T x group) per
# program (a multiple of 16), bounding VMEM: 512 x 128 float32 acc and 512 x 128 K/V blocks, double-buffered.
CACHE_ATTENTION_TPU = dict(block_k=512, max_rows=512)

# Most channels per program of the Mamba-1 state update and the conv decode step (VMEM stays small:
# a [512, N] float32 state block pads to 512 x 128 lanes, 256 KiB).
SELECTIVE_STATE_UPDATE_TPU_BLOCK = 512
CAUSAL_CONV1D_UPDATE_TPU_BLOCK = 512

# selective_scan (prefill): most channels (lanes) per program and steps per time chunk, both multiples of 128.
# VMEM per program: [chunk, block] x/dt/z/y blocks double-buffered plus three float32 [chunk, block] scratches,
# under 3 MiB in float32.
SELECTIVE_SCAN_TPU_BLOCK = 512
SELECTIVE_SCAN_TPU_CHUNK = 128

# causal_conv1d prefill: most steps (rows) and channels (lanes; a multiple of 128) per block: a 256 x 512
# float32 x/y block is 512 KiB, a few of them double-buffered plus the float32 window stay far below VMEM.
CAUSAL_CONV1D_TPU = dict(block_t=256, block_c=512)

# ssd_chunked: steps per chunk (a multiple of 16, the bf16 sublane tile); the [L, L] float32 in-chunk
# matrices (128 x 128: 64 KiB each) and the [P, N] state scratch stay small in VMEM.
SSD_CHUNKED_TPU_CHUNK = 128

# quantized_matmul: most rows of x (M) and weight columns (N, a multiple of 128) per program, and most rows
# of K per step (whole groups) and VMEM bytes of the x block (short groups pad x's lanes to 128): a 2048 x 512
# int8 weight block is 1 MiB, x 2 MiB, both double-buffered, the float32 accumulator 512 KiB at most.
QUANTIZED_MATMUL_TPU = dict(block_m=256, block_n=512, block_k=2048, x_block_bytes=2 * 2**20)


def tpu_compiler_params(kernel: str, interpret):
    """The `compiler_params` for `pallas_call` of `kernel`'s TPU variant; none when interpreting."""
    if interpret:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(**TPU_PARAMS.get(kernel, {}))


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
