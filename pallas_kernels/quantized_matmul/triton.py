"""Quantized matmul kernel for the Pallas Triton lowering (GPU): weight-only and integer-activation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.lowering import triton_params
from pallas_kernels.quantized_matmul.weights import (
    KERNEL_BITS,
    QuantizedWeight,
    check_inputs,
    check_int8_inputs,
    check_kernel_bits,
    check_symmetric,
    group_rows,
    sign_extend_nibble,
)


@dataclasses.dataclass(frozen=True)
class QuantizedMatmulBlockSizes(BlockSizes):
    """`quantized_matmul_pallas` / `quantized_matmul_int8_pallas`: output columns per program, rows per
    program at most (decode has M = 1..16 rows; Triton's dot needs >= 16, padded with masked loads), and
    most stored weight rows per K chunk of the dots (a [256, 64] int8 weight tile and a [32, 256] x tile
    per chunk, however long a group is). Powers of two; untuned. Then the Triton launch parameters."""

    block_n: int = 64
    max_block_m: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_n", "max_block_m", "block_k", least=16)


def _qmm_kernel(
    x_ref, values_ref, scales_ref, *refs, bits: int, group_rows: int, chunk_rows: int, block_m: int, block_n: int
):
    """One (row block, column block) program: out[BM, BN] = sum over groups of (x_g @ q_g) * scale_g.

    x_ref: [M, K] (8 bits) or [M, K / 2, 2] (4 bits: [..., 0] meets the low nibbles, [..., 1] the high);
    values_ref: [K or K / 2, N]; scales_ref: [K / group_size, N]; then, for int8 x only, x_scale_ref [1];
    then out_ref [M, N]. All refs are whole arrays; rows past M and columns past N are masked. Each group
    of group_rows stored rows is read in chunks of chunk_rows (a power of two dividing it), whose dots
    sum into the group's [BM, BN] partial product; the scale is constant over a group, so it multiplies
    that product instead of every [group, BN] weight element. Float x: float32 dots of x with the weights
    converted to x's dtype. int8 x: int8 x int8 dots summed exactly in int32 (integer tensor cores),
    converted to float32 once per group, and the sum scaled by x_scale at the end.
    """
    integer = x_ref.dtype == jnp.int8
    x_scale_ref, out_ref = refs if integer else (None, *refs)
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)
    row_ok = (i * block_m + jnp.arange(block_m) < out_ref.shape[0])[:, None]
    col_ok = j * block_n + jnp.arange(block_n) < out_ref.shape[1]
    part_dtype = jnp.int32 if integer else jnp.float32
    if integer:

        def dot(x, q):
            return jnp.dot(x, q.astype(jnp.int8), preferred_element_type=jnp.int32)
    else:

        def dot(x, q):  # HIGHEST: float32 x gets an IEEE float32 dot (not TF32); bfloat16 products are exact
            return jnp.dot(
                x, q.astype(x_ref.dtype), preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
            )

    def chunk(c, part):
        k_rows = pl.ds(c * chunk_rows, chunk_rows)
        q = plgpu.load(values_ref.at[k_rows, cols], mask=col_ok[None, :], other=0)

        def load_x(*parity):
            return plgpu.load(x_ref.at[(rows, k_rows, *parity)], mask=row_ok, other=0)

        if bits == 8:
            return part + dot(load_x(), q)
        q = q.astype(jnp.int32)
        return (
            part
            + dot(load_x(jnp.int32(0)), sign_extend_nibble(q & 0xF))
            + dot(load_x(jnp.int32(1)), sign_extend_nibble(q >> 4))
        )

    def group(g, acc):
        chunks = group_rows // chunk_rows
        part = jax.lax.fori_loop(g * chunks, (g + 1) * chunks, chunk, jnp.zeros((block_m, block_n), part_dtype))
        scale = plgpu.load(scales_ref.at[g, cols], mask=col_ok, other=0).astype(jnp.float32)
        return acc + part.astype(jnp.float32) * scale[None, :]

    acc = jax.lax.fori_loop(0, scales_ref.shape[0], group, jnp.zeros((block_m, block_n), jnp.float32))
    if integer:
        acc = acc * jnp.sum(x_scale_ref[...])
    plgpu.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=row_ok & col_ok[None, :])


def _min_chunk_rows(integer: bool) -> int:
    """Fewest stored rows in a K chunk (the K extent of the kernel's dots): Triton dots need dims >= 16, and
    integer tensor-core MMAs consume K in steps of 32 (m16n8k32 on Ampere, wgmma k32 on Hopper)."""
    return 32 if integer else 16


def _chunk_rows(qw: QuantizedWeight, blocks: QuantizedMatmulBlockSizes) -> int:
    """Stored rows per K chunk: the largest power of two dividing a group's rows (Triton blocks must be
    powers of two), at most `blocks.block_k` (long groups, such as one per-channel group of all K rows,
    would not fit on chip)."""
    rows = group_rows(qw)
    return min(rows & -rows, blocks.block_k)


def kernel_supports(qw: QuantizedWeight, integer: bool, blocks: QuantizedMatmulBlockSizes) -> bool:
    """Whether the GPU kernel takes `qw`: 4 or 8 bits, with K chunks long enough for Triton's dots."""
    return qw.bits in KERNEL_BITS and _chunk_rows(qw, blocks) >= _min_chunk_rows(integer)


def _gpu_call(
    x, qw: QuantizedWeight, x_scale, out_dtype, blocks: QuantizedMatmulBlockSizes, interpret: bool, where: str
):
    """Launches `_qmm_kernel` on x: float [..., K] (x_scale None) or int8 codes (x_scale a float32 scalar),
    after the caller's checks; see `quantized_matmul_pallas`."""
    check_symmetric(qw, where)
    check_kernel_bits(qw, where)
    integer = x_scale is not None
    if not kernel_supports(qw, integer, blocks):
        least = _min_chunk_rows(integer) * (1 if qw.bits == 8 else 2)
        raise ValueError(
            f"{where}: the Pallas kernel needs group_size to be a multiple of {least} for "
            f"{qw.bits} bits, got {qw.group_size}; use impl='xla'"
        )
    k, n = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    block_m = min(max(16, pl.next_power_of_2(m)), blocks.max_block_m)
    if qw.bits == 4:
        x2 = x2.reshape(m, k // 2, 2)  # a free view: even and odd columns meet the low and high nibbles
    out = pl.pallas_call(
        functools.partial(
            _qmm_kernel,
            bits=qw.bits,
            group_rows=group_rows(qw),
            chunk_rows=_chunk_rows(qw, blocks),
            block_m=block_m,
            block_n=blocks.block_n,
        ),
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, blocks.block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name=where,
    )(x2, qw.values, qw.scales, *(() if x_scale is None else (x_scale.reshape(1),)))
    return out.reshape(*lead, n)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def quantized_matmul_pallas(
    x, qw: QuantizedWeight, *, block_sizes: QuantizedMatmulBlockSizes | None = None, interpret: bool = False
):
    """Pallas version of `quantized_matmul_ref` (same contract).

    x is flattened to [M, K]; grid (M / BM, N / BN) with BM = next power of two >= M, in
    [16, `max_block_m`] (Triton dots need >= 16 rows: the padding rows are masked loads of zeros) and
    BN = `block_n`. Each program loops over the K groups, loading one group's int8 (or packed int4) tile
    (in K chunks of at most `block_k` stored rows) and scales for its BN columns, unpacking and converting
    it on chip, and keeps its float32 [BM, BN] accumulator on chip. Needs stored rows per group
    (group_size for 8 bits, group_size / 2 for 4 bits) that are a multiple of 16: group_size a multiple
    of 16 (8 bits) or 32 (4 bits).
    """
    check_inputs(x, qw)
    blocks = QuantizedMatmulBlockSizes.resolve(block_sizes, "quantized_matmul")
    return _gpu_call(x, qw, None, x.dtype, blocks, interpret, "quantized_matmul")


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def quantized_matmul_int8_pallas(
    xq,
    x_scale,
    qw: QuantizedWeight,
    *,
    out_dtype=jnp.float32,
    block_sizes: QuantizedMatmulBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas (Triton) version of `quantized_matmul_int8_ref` (same contract): `quantized_matmul_pallas`'s
    grid and blocks, with int8 x int8 -> int32 dots summed per group in int32 (4-bit weights unpacked to
    int8 on chip). Needs stored rows per group that are a multiple of 32: group_size a multiple of 32
    (8 bits) or 64 (4 bits); per-channel weights (group_size == K) thus need K a multiple of 32 / 64.
    """
    x_scale = check_int8_inputs(xq, x_scale, qw, out_dtype)
    blocks = QuantizedMatmulBlockSizes.resolve(block_sizes, "quantized_matmul_int8")
    return _gpu_call(xq, qw, x_scale, out_dtype, blocks, interpret, "quantized_matmul_int8")
