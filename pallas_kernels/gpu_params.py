"""GPU-specific parameters of every Pallas kernel, in one place.

The kernels are written for the Pallas Triton lowering (runs on Ampere and Hopper). JAX now defaults
to Mosaic GPU and has deprecated Triton; a Mosaic GPU variant of a kernel would add its own entry
here (and its own lowering choice in `compiler_params`) without touching the kernel modules' maths.
Block-size choices that are only about speed on a GPU live here too.
"""

from __future__ import annotations

# Triton launch parameters per kernel name (as passed to `resolve_impl`).
TRITON_PARAMS: dict[str, dict[str, int]] = {
    "ssd_step": dict(num_warps=4, num_stages=1),
    "ssd_chunked": dict(num_warps=8, num_stages=2),
    "selective_state_update": dict(num_warps=4, num_stages=1),
    "flash_attention": dict(num_warps=4, num_stages=2),
    "cache_attention": dict(num_warps=4, num_stages=2),
    "quantized_matmul": dict(num_warps=4, num_stages=3),
    "selective_scan": dict(num_warps=4, num_stages=1),
    "causal_conv1d": dict(num_warps=4, num_stages=2),
    "causal_conv1d_update": dict(num_warps=4, num_stages=1),
}

# (queries, keys) per block of the prefill flash attention (powers of two, >= 16 for Triton's dot).
FLASH_ATTENTION_BLOCKS = (64, 64)

# Split-K attention over a cache: keys per block, query rows (T x group) per program at most, and
# about how many programs to launch (a few per SM of an H100's 132) when choosing the split count.
SPLIT_K_ATTENTION = dict(block_k=64, max_rows=64, target_programs=264)

# Channels per program in the Mamba-1 state update (a power of two; Triton blocks must be).
SELECTIVE_STATE_UPDATE_BLOCK = 64

# Mamba-1 selective scan (prefill): channels per program and time steps loaded at once (powers of two).
# Small channel blocks give more programs for the sequential walk over time (Dm=1536, Bt=1: 48 programs).
SELECTIVE_SCAN_BLOCK = 32
SELECTIVE_SCAN_CHUNK = 16

# Steps per chunk (at most) and head channels per program of the Mamba-2 SSD chunked scan (powers of
# two, >= 16 for Triton's dot); untuned.
SSD_CHUNKED_BLOCKS = (64, 32)

# Weight-only quantized matmul: output columns per program, and rows per program at most (decode has
# M = 1..16 rows; Triton's dot needs >= 16, padded with masked loads). Powers of two; untuned.
QUANTIZED_MATMUL_BLOCK_N = 64
QUANTIZED_MATMUL_MAX_BLOCK_M = 32

# Causal conv1d prefill: channels per program, steps per time block, time blocks per program (powers
# of two; a [16, 64] float32 tile is 8 values per thread at 4 warps). Time chunks run in parallel, so
# B=1, C=2048, T=4096 gives 32 x 16 programs. Decode step: channels per program. Untuned.
CAUSAL_CONV1D_CHANNEL_BLOCK = 64
CAUSAL_CONV1D_TIME_BLOCK = 16
CAUSAL_CONV1D_BLOCKS_PER_PROGRAM = 16
CAUSAL_CONV1D_UPDATE_BLOCK = 128


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
