"""Quantized matmul kernel for Mosaic TPU: weight-only and integer-activation, any group size."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.lowering import tpu_interpret, tpu_params
from pallas_kernels.quantized_matmul.weights import (
    QuantizedWeight,
    check_inputs,
    check_int8_inputs,
    check_kernel_bits,
    check_symmetric,
    group_rows,
)


@dataclasses.dataclass(frozen=True)
class QuantizedMatmulTPUBlockSizes(BlockSizes):
    """`quantized_matmul_pallas_tpu` / `quantized_matmul_int8_pallas_tpu`: most rows of x (M) and weight
    columns (N, a multiple of 128) per program, and most rows of K per step (whole groups) and VMEM bytes
    of the x block (short groups pad x's lanes to 128): a 2048 x 512 int8 weight block is 1 MiB, x 2 MiB,
    both double-buffered, the float32 accumulator 512 KiB at most."""

    block_m: int = 256
    block_n: int = 512
    block_k: int = 2048
    x_block_bytes: int = 2 * 2**20

    def __post_init__(self):
        super().__post_init__()
        self._multiples(128, "block_n")


def _qmm_tpu_kernel(x_ref, values_ref, scales_ref, *refs, bits: int):
    """One (row block, column block, K block) step. x: [gpb, bm, gr] (8 bits) or [2, gpb, bm, gr] (4 bits:
    [0] meets the low nibbles, [1] the high); values: int8 [gpb, gr, bn]; scales: [gpb, 1, bn]; then, for
    int8 x only, x_scale [1] (SMEM); output [bm, bn]; scratch acc [bm, bn] float32. gpb groups of gr
    stored rows each; the scale is constant over a group, so it multiplies the group's [bm, bn] partial
    product, not every weight element. int8 x: int8 x int8 -> int32 group dots on the MXU, scaled by
    x_scale when the output is written."""
    integer = x_ref.dtype == jnp.int8
    x_scale_ref, out_ref, acc_ref = refs if integer else (None, *refs)
    k = pl.program_id(2)
    if integer:
        dot = functools.partial(jnp.dot, preferred_element_type=jnp.int32)
        as_x = lambda q: q.astype(jnp.int8)  # noqa: E731
    else:
        # HIGHEST: float32 x gets a float32 dot (not bfloat16 passes); bfloat16 products are exact anyway.
        dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        as_x = lambda q: q.astype(jnp.float32).astype(x_ref.dtype)  # noqa: E731  (integers convert via float32)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def group(g, carry):
        q = values_ref[g]
        if bits == 8:
            part = dot(x_ref[g], as_x(q))
        else:  # int8 bytes sign-extend to int32: arithmetic shifts give the signed high and low nibbles
            q = q.astype(jnp.int32)
            part = dot(x_ref[0, g], as_x((q << 28) >> 28)) + dot(x_ref[1, g], as_x(q >> 4))
        acc_ref[...] += part.astype(jnp.float32) * scales_ref[g].astype(jnp.float32)
        return carry

    jax.lax.fori_loop(0, values_ref.shape[0], group, None)

    @pl.when(k == pl.num_programs(2) - 1)
    def _finalize():
        acc = acc_ref[...]
        out_ref[...] = (acc * x_scale_ref[0] if integer else acc).astype(out_ref.dtype)


def _tpu_block(size: int, cap: int, tile: int) -> int:
    """All of `size` when it is at most `cap` (a full-dimension block), else `cap` rounded down to `tile`
    (at least one tile)."""
    return size if size <= cap else max(tile, cap - cap % tile)


def _tpu_call(
    x, qw: QuantizedWeight, x_scale, out_dtype, blocks: QuantizedMatmulTPUBlockSizes, interpret: bool, where: str
):
    """Launches `_qmm_tpu_kernel` on x: float [..., K] (x_scale None) or int8 codes (x_scale a float32
    scalar), after the caller's checks; see `quantized_matmul_pallas_tpu`."""
    check_symmetric(qw, where)
    check_kernel_bits(qw, where)
    k, n = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    groups, rows = k // qw.group_size, group_rows(qw)
    sublanes = 32 // jnp.dtype(x.dtype).itemsize  # 8 rows for float32, 16 for bfloat16, 32 for int8
    block_m = _tpu_block(m, blocks.block_m, sublanes)
    block_n = _tpu_block(n, blocks.block_n, 128)
    # x's VMEM bytes per group: its gr lanes pad to whole 128-lane tiles, which short groups make costly.
    x_group_bytes = (
        (2 if qw.bits == 4 else 1)
        * pl.cdiv(rows, 128)
        * 128
        * pl.cdiv(block_m, sublanes)
        * sublanes
        * jnp.dtype(x.dtype).itemsize
    )
    per_block = max(1, min(blocks.block_k // qw.group_size, blocks.x_block_bytes // x_group_bytes))
    gpb = next(d for d in range(min(per_block, groups), 0, -1) if groups % d == 0)
    if qw.bits == 8:
        xg = x2.reshape(m, groups, rows).transpose(1, 0, 2)
        x_spec = pl.BlockSpec((gpb, block_m, rows), lambda i, j, g: (g, i, 0))
        values = qw.values
    else:
        xg = x2.reshape(m, groups, rows, 2).transpose(3, 1, 0, 2)
        x_spec = pl.BlockSpec((2, gpb, block_m, rows), lambda i, j, g: (0, g, i, 0))
        values = jax.lax.bitcast_convert_type(qw.values, jnp.int8)  # signed bytes: shifts sign-extend
    in_specs = [
        x_spec,
        pl.BlockSpec((gpb, rows, block_n), lambda i, j, g: (g, 0, j)),
        pl.BlockSpec((gpb, 1, block_n), lambda i, j, g: (g, 0, j)),
    ]
    inputs = [xg, values.reshape(groups, rows, n), qw.scales.reshape(groups, 1, n)]
    if x_scale is not None:
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        inputs.append(x_scale.reshape(1))
    out = pl.pallas_call(
        functools.partial(_qmm_tpu_kernel, bits=qw.bits),
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n), groups // gpb),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, g: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        # (row block, column block, K block): the K axis carries the float32 accumulator in scratch.
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary"), interpret),
        interpret=tpu_interpret(interpret),
        name=f"{where}_tpu",
    )(*inputs)
    return out.reshape(*lead, n)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def quantized_matmul_pallas_tpu(
    x, qw: QuantizedWeight, *, block_sizes: QuantizedMatmulTPUBlockSizes | None = None, interpret: bool = False
):
    """TPU (Mosaic) version of `quantized_matmul_ref` (same contract); any group_size.

    x is flattened to [M, K] and regrouped (a copy of x only, small in decode) to [G, M, gr] with G
    = K / group_size groups of gr stored rows (group_size, or group_size / 2 for 4 bits, whose even
    and odd columns split into [2, G, M, gr] to meet the low and high nibbles); the weight is viewed
    as [G, gr, N] and the scales as [G, 1, N] (free reshapes), so every block's last two dims are full
    (gr, 1) or tiled (M, N). Grid (M / bm, N / bn, G / gpb), K axis "arbitrary": each step DMAs gpb
    whole groups of int8 (or packed int4) bytes and their scales for bn columns, dequantizes them in
    VMEM, and adds the scaled group products to a float32 [bm, bn] VMEM accumulator. bm and bn are
    M and N when at most `block_sizes`' caps, else the caps: the last M / N block may be partial (its
    rows / columns past M / N read garbage that only reaches output elements that are not written
    back), so neither x nor the weight is padded. gpb is the largest divisor of G with at most
    `block_k` rows of K per step and an x block of at most `x_block_bytes` in VMEM.
    """
    check_inputs(x, qw)
    blocks = QuantizedMatmulTPUBlockSizes.resolve(block_sizes, "quantized_matmul")
    return _tpu_call(x, qw, None, x.dtype, blocks, interpret, "quantized_matmul")


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def quantized_matmul_int8_pallas_tpu(
    xq,
    x_scale,
    qw: QuantizedWeight,
    *,
    out_dtype=jnp.float32,
    block_sizes: QuantizedMatmulTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """TPU (Mosaic) version of `quantized_matmul_int8_ref` (same contract); any group_size.

    `quantized_matmul_pallas_tpu`'s grid and blocks (int8 x rows tile by 32), with int8 x int8 -> int32
    group dots on the MXU (4-bit weights unpacked to int8 in VMEM) and x_scale read from SMEM.
    Checked in TPU interpret mode and by the Mosaic lowering only: not yet run on a TPU.
    """
    x_scale = check_int8_inputs(xq, x_scale, qw, out_dtype)
    blocks = QuantizedMatmulTPUBlockSizes.resolve(block_sizes, "quantized_matmul_int8")
    return _tpu_call(xq, qw, x_scale, out_dtype, blocks, interpret, "quantized_matmul_int8")
