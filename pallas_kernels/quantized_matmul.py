"""Weight-only quantized matmul for decode: x (float) times a weight stored as int8 or packed int4.

The weight w [K, N] is quantized symmetrically per group of `group_size` rows along K:
    scale[g, n] = absmax(w[g * group_size : (g + 1) * group_size, n]) / q_max,
    q[k, n] = clip(round(w[k, n] / scale[k // group_size, n]), q_min, q_max),
with (q_min, q_max) = (-127, 127) for 8 bits and (-8, 7) for 4 bits. 8-bit values are stored as int8
[K, N]; 4-bit values two per byte along K as uint8 [K / 2, N]: the low nibble holds even row k, the
high nibble odd row k + 1, each a two's-complement 4-bit number.

Decode reads every weight once per token, so the kernel is memory bound: it streams the quantized
bytes (2x / 4x fewer than bfloat16) and dequantizes on chip. `quantized_matmul_pallas` is the GPU (Triton)
kernel, `quantized_matmul_pallas_tpu` the TPU (Mosaic) one.

`quantized_matmul_int8*` is the integer-activation path of Quamba2's W8A8 / W4A8: x arrives as int8 codes
xq [..., K] with a static per-tensor float scale x_scale, and per group g of K
    acc_g[n] = sum_{k in g} xq[k] * q[k, n]            (int8 x int8 products, exact int32 sums),
    out[n] = x_scale * sum_g acc_g[n] * scale[g, n]    (float32),
with one group (group_size == K) for per-channel weights. The same kernels serve both paths: an int8 x
switches their group dots to int8 x int8 -> int32 (4-bit weights unpacked to int8 on chip) and adds the
final x_scale multiply. int32 cannot overflow below 2^31 / 127^2 (about 133k) rows per group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.gpu_params import QUANTIZED_MATMUL_BLOCK_N, QUANTIZED_MATMUL_MAX_BLOCK_M, compiler_params
from pallas_kernels.tpu_params import QUANTIZED_MATMUL_TPU, tpu_compiler_params, tpu_interpret

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
# Most stored weight rows per K chunk of the GPU kernel's dots (a power of two; untuned): a [256, 64] int8
# weight tile and a [32, 256] x tile per chunk, however long a group is.
QUANTIZED_MATMUL_BLOCK_K = 256
_Q_RANGE = {8: (-127, 127), 4: (-8, 7)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"],
                   meta_fields=["bits", "group_size"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight w [K, N]; `bits` and `group_size` are static pytree metadata (not leaves).

    values: int8 [K, N] (8 bits) or uint8 [K / 2, N] (4 bits, two values per byte along K);
    scales: [K / group_size, N], float32 or bfloat16.
    """

    values: jax.Array
    scales: jax.Array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the unquantized weight."""
        rows, n = self.values.shape
        return (rows * 2 if self.bits == 4 else rows), n


def _check_layout(bits, group_size, k: int, where: str):
    if bits not in _Q_RANGE:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"{where}: 4-bit weights pack two rows per byte, so K must be even, got K={k}")
    if k % group_size:
        raise ValueError(f"{where}: K ({k}) must be a multiple of group_size ({group_size})")


def _check_weight(qw: QuantizedWeight, where: str):
    k, n = qw.shape
    _check_layout(qw.bits, qw.group_size, k, where)
    values_dtype = jnp.int8 if qw.bits == 8 else jnp.uint8
    if qw.values.dtype != values_dtype:
        raise ValueError(f"{where}: {qw.bits}-bit values must be {jnp.dtype(values_dtype).name}, "
                         f"got {qw.values.dtype}")
    if tuple(qw.scales.shape) != (k // qw.group_size, n):
        raise ValueError(f"{where}: scales must have shape {(k // qw.group_size, n)}, "
                         f"got {tuple(qw.scales.shape)}")


def _check_rows(x, name: str, qw: QuantizedWeight, where: str):
    k = qw.shape[0]
    if x.shape[-1:] != (k,):
        raise ValueError(f"{where}: {name} must have shape [..., {k}] (the weight's K), got {tuple(x.shape)}")


def _check(x, qw: QuantizedWeight):
    _check_weight(qw, "quantized_matmul")
    _check_rows(x, "x", qw, "quantized_matmul")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantized_matmul: x must be floating point, got {x.dtype}")


def _check_int8(xq, x_scale, qw: QuantizedWeight, out_dtype):
    """Validates the integer-activation inputs; returns x_scale as a float32 scalar."""
    where = "quantized_matmul_int8"
    _check_weight(qw, where)
    _check_rows(xq, "xq", qw, where)
    if xq.dtype != jnp.int8:
        raise ValueError(f"{where}: xq must be int8 activation codes, got {xq.dtype}")
    x_scale = jnp.asarray(x_scale)
    if x_scale.shape != () or not jnp.issubdtype(x_scale.dtype, jnp.floating):
        raise ValueError(f"{where}: x_scale must be a floating-point scalar (one per-tensor scale), got "
                         f"{x_scale.dtype} with shape {tuple(x_scale.shape)}")
    if not jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating):
        raise ValueError(f"{where}: out_dtype must be a floating-point dtype, got {jnp.dtype(out_dtype)}")
    return x_scale.astype(jnp.float32)


def pack_int4(q):
    """q: int [K, N] with values in [-8, 7], K even -> uint8 [K / 2, N] (low nibble: even rows)."""
    q = q.astype(jnp.int32)
    return ((q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)).astype(jnp.uint8)


def _sign_extend_nibble(nibble):
    """Two's-complement 4-bit values 0..15 (int32) -> -8..7."""
    return (nibble ^ 8) - 8


def unpack_int4(values):
    """uint8 [K / 2, N] -> int32 [K, N]: the inverse of `pack_int4`."""
    v = values.astype(jnp.int32)
    pairs = jnp.stack([_sign_extend_nibble(v & 0xF), _sign_extend_nibble(v >> 4)], axis=1)
    return pairs.reshape(2 * values.shape[0], values.shape[1])


def quantize_weights(w, bits: int = 8, group_size: int = 128, scale_dtype=jnp.float32) -> QuantizedWeight:
    """w: [K, N] float -> `QuantizedWeight` with symmetric per-group absmax scales in `scale_dtype`.

    q is rounded against the stored (possibly bfloat16-rounded) scale, so |w - dequantized| <= scale / 2.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_weights: w must be 2-D [K, N], got shape {tuple(w.shape)}")
    k, n = w.shape
    _check_layout(bits, group_size, k, "quantize_weights")
    q_min, q_max = _Q_RANGE[bits]
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    scales = (jnp.max(jnp.abs(groups), axis=1) / q_max).astype(scale_dtype)
    s32 = scales.astype(jnp.float32)[:, None, :]
    # An all-zero group has scale 0: divide by 1 instead, its q are 0 either way.
    q = jnp.clip(jnp.round(groups / jnp.where(s32 > 0, s32, 1.0)), q_min, q_max).reshape(k, n)
    values = q.astype(jnp.int8) if bits == 8 else pack_int4(q)
    return QuantizedWeight(values, scales, bits, group_size)


def _int_values(qw: QuantizedWeight):
    """The quantized values q of `qw` as int32 [K, N]."""
    return qw.values.astype(jnp.int32) if qw.bits == 8 else unpack_int4(qw.values)


def dequantize_weights(qw: QuantizedWeight):
    """QuantizedWeight -> float32 [K, N]."""
    k, n = qw.shape
    groups = (_int_values(qw).astype(jnp.float32).reshape(-1, qw.group_size, n)
              * qw.scales.astype(jnp.float32)[:, None, :])
    return groups.reshape(k, n)


def quantized_matmul_ref(x, qw: QuantizedWeight):
    """x: [..., K] -> x @ dequantize_weights(qw): [..., N] in x's dtype, float32 accumulation."""
    _check(x, qw)
    out = jnp.matmul(x.astype(jnp.float32), dequantize_weights(qw), precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def quantized_matmul_int8_ref(xq, x_scale, qw: QuantizedWeight, out_dtype=jnp.float32):
    """xq: int8 [..., K], x_scale: float scalar -> [..., N] in out_dtype:
    x_scale * sum_g (xq_g @ q_g in int32) * scale_g, summed over groups g in float32.

    One batched int8 x int8 -> int32 dot over the groups: exact, but its [K / group_size, M, N] int32
    result is materialized, so this is sized for decode and checks rather than long prefills.
    """
    x_scale = _check_int8(xq, x_scale, qw, out_dtype)
    k, n = qw.shape
    groups = k // qw.group_size
    q = _int_values(qw).astype(jnp.int8).reshape(groups, qw.group_size, n)
    xg = xq.reshape(-1, groups, qw.group_size)
    acc = jax.lax.dot_general(xg, q, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # [G, M, N]
    out = jnp.sum(acc.astype(jnp.float32) * qw.scales.astype(jnp.float32)[:, None, :], axis=0)
    return (x_scale * out).reshape(*xq.shape[:-1], n).astype(out_dtype)


def _group_rows(qw: QuantizedWeight) -> int:
    """Stored rows of `values` per group (4-bit values pack two rows of K per stored row)."""
    return qw.group_size if qw.bits == 8 else qw.group_size // 2


def _qmm_kernel(x_ref, values_ref, scales_ref, *refs, bits: int, group_rows: int, chunk_rows: int, block_m: int,
                block_n: int):
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
            return jnp.dot(x, q.astype(x_ref.dtype), preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST)

    def chunk(c, part):
        k_rows = pl.ds(c * chunk_rows, chunk_rows)
        q = plgpu.load(values_ref.at[k_rows, cols], mask=col_ok[None, :], other=0)

        def load_x(*parity):
            return plgpu.load(x_ref.at[(rows, k_rows, *parity)], mask=row_ok, other=0)

        if bits == 8:
            return part + dot(load_x(), q)
        q = q.astype(jnp.int32)
        return (part + dot(load_x(jnp.int32(0)), _sign_extend_nibble(q & 0xF))
                + dot(load_x(jnp.int32(1)), _sign_extend_nibble(q >> 4)))

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


def _chunk_rows(qw: QuantizedWeight) -> int:
    """Stored rows per K chunk: the largest power of two dividing a group's rows (Triton blocks must be
    powers of two), at most QUANTIZED_MATMUL_BLOCK_K (long groups, such as one per-channel group of all
    K rows, would not fit on chip)."""
    rows = _group_rows(qw)
    return min(rows & -rows, QUANTIZED_MATMUL_BLOCK_K)


def _kernel_supports(qw: QuantizedWeight, integer: bool = False) -> bool:
    """Whether the GPU kernel takes `qw`: its K chunks must be long enough for Triton's dots."""
    return _chunk_rows(qw) >= _min_chunk_rows(integer)


def _gpu_call(x, qw: QuantizedWeight, x_scale, out_dtype, interpret: bool, where: str):
    """Launches `_qmm_kernel` on x: float [..., K] (x_scale None) or int8 codes (x_scale a float32 scalar),
    after the caller's checks; see `quantized_matmul_pallas`."""
    integer = x_scale is not None
    if not _kernel_supports(qw, integer):
        least = _min_chunk_rows(integer) * (1 if qw.bits == 8 else 2)
        raise ValueError(f"{where}: the Pallas kernel needs group_size to be a multiple of {least} for "
                         f"{qw.bits} bits, got {qw.group_size}; use impl='xla'")
    k, n = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    block_m = min(max(16, pl.next_power_of_2(m)), QUANTIZED_MATMUL_MAX_BLOCK_M)
    block_n = QUANTIZED_MATMUL_BLOCK_N
    if qw.bits == 4:
        x2 = x2.reshape(m, k // 2, 2)  # a free view: even and odd columns meet the low and high nibbles
    out = pl.pallas_call(
        functools.partial(_qmm_kernel, bits=qw.bits, group_rows=_group_rows(qw), chunk_rows=_chunk_rows(qw),
                          block_m=block_m, block_n=block_n),
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=compiler_params("quantized_matmul", interpret),
        interpret=interpret,
        name=where,
    )(x2, qw.values, qw.scales, *(() if x_scale is None else (x_scale.reshape(1),)))
    return out.reshape(*lead, n)


def quantized_matmul_pallas(x, qw: QuantizedWeight, *, interpret: bool = False):
    """Pallas version of `quantized_matmul_ref` (same contract).

    x is flattened to [M, K]; grid (M / BM, N / BN) with BM = next power of two >= M, in
    [16, QUANTIZED_MATMUL_MAX_BLOCK_M] (Triton dots need >= 16 rows: the padding rows are masked
    loads of zeros) and BN = QUANTIZED_MATMUL_BLOCK_N. Each program loops over the K groups, loading
    one group's int8 (or packed int4) tile (in K chunks of at most QUANTIZED_MATMUL_BLOCK_K stored rows)
    and scales for its BN columns, unpacking and converting it on chip, and keeps its float32 [BM, BN]
    accumulator on chip. Needs stored rows per group (group_size for 8 bits, group_size / 2 for 4 bits)
    that are a multiple of 16: group_size a multiple of 16 (8 bits) or 32 (4 bits).
    """
    _check(x, qw)
    return _gpu_call(x, qw, None, x.dtype, interpret, "quantized_matmul")


def quantized_matmul_int8_pallas(xq, x_scale, qw: QuantizedWeight, *, out_dtype=jnp.float32,
                                 interpret: bool = False):
    """Pallas (Triton) version of `quantized_matmul_int8_ref` (same contract): `quantized_matmul_pallas`'s
    grid and blocks, with int8 x int8 -> int32 dots summed per group in int32 (4-bit weights unpacked to
    int8 on chip). Needs stored rows per group that are a multiple of 32: group_size a multiple of 32
    (8 bits) or 64 (4 bits); per-channel weights (group_size == K) thus need K a multiple of 32 / 64.
    """
    x_scale = _check_int8(xq, x_scale, qw, out_dtype)
    return _gpu_call(xq, qw, x_scale, out_dtype, interpret, "quantized_matmul_int8")


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


def _tpu_call(x, qw: QuantizedWeight, x_scale, out_dtype, interpret: bool, where: str):
    """Launches `_qmm_tpu_kernel` on x: float [..., K] (x_scale None) or int8 codes (x_scale a float32
    scalar), after the caller's checks; see `quantized_matmul_pallas_tpu`."""
    k, n = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    groups, rows = k // qw.group_size, _group_rows(qw)
    sublanes = 32 // jnp.dtype(x.dtype).itemsize  # 8 rows for float32, 16 for bfloat16, 32 for int8
    block_m = _tpu_block(m, QUANTIZED_MATMUL_TPU["block_m"], sublanes)
    block_n = _tpu_block(n, QUANTIZED_MATMUL_TPU["block_n"], 128)
    # x's VMEM bytes per group: its gr lanes pad to whole 128-lane tiles, which short groups make costly.
    x_group_bytes = ((2 if qw.bits == 4 else 1) * pl.cdiv(rows, 128) * 128 * pl.cdiv(block_m, sublanes) * sublanes
                     * jnp.dtype(x.dtype).itemsize)
    per_block = max(1, min(QUANTIZED_MATMUL_TPU["block_k"] // qw.group_size,
                           QUANTIZED_MATMUL_TPU["x_block_bytes"] // x_group_bytes))
    gpb = next(d for d in range(min(per_block, groups), 0, -1) if groups % d == 0)
    if qw.bits == 8:
        xg = x2.reshape(m, groups, rows).transpose(1, 0, 2)
        x_spec = pl.BlockSpec((gpb, block_m, rows), lambda i, j, g: (g, i, 0))
        values = qw.values
    else:
        xg = x2.reshape(m, groups, rows, 2).transpose(3, 1, 0, 2)
        x_spec = pl.BlockSpec((2, gpb, block_m, rows), lambda i, j, g: (0, g, i, 0))
        values = jax.lax.bitcast_convert_type(qw.values, jnp.int8)  # signed bytes: shifts sign-extend
    in_specs = [x_spec, pl.BlockSpec((gpb, rows, block_n), lambda i, j, g: (g, 0, j)),
                pl.BlockSpec((gpb, 1, block_n), lambda i, j, g: (g, 0, j))]
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
        compiler_params=tpu_compiler_params("quantized_matmul", interpret),
        interpret=tpu_interpret(interpret),
        name=f"{where}_tpu",
    )(*inputs)
    return out.reshape(*lead, n)


def quantized_matmul_pallas_tpu(x, qw: QuantizedWeight, *, interpret: bool = False):
    """TPU (Mosaic) version of `quantized_matmul_ref` (same contract); any group_size.

    x is flattened to [M, K] and regrouped (a copy of x only, small in decode) to [G, M, gr] with G
    = K / group_size groups of gr stored rows (group_size, or group_size / 2 for 4 bits, whose even
    and odd columns split into [2, G, M, gr] to meet the low and high nibbles); the weight is viewed
    as [G, gr, N] and the scales as [G, 1, N] (free reshapes), so every block's last two dims are full
    (gr, 1) or tiled (M, N). Grid (M / bm, N / bn, G / gpb), K axis "arbitrary": each step DMAs gpb
    whole groups of int8 (or packed int4) bytes and their scales for bn columns, dequantizes them in
    VMEM, and adds the scaled group products to a float32 [bm, bn] VMEM accumulator. bm and bn are
    M and N when at most QUANTIZED_MATMUL_TPU's caps, else the caps: the last M / N block may be
    partial (its rows / columns past M / N read garbage that only reaches output elements that are
    not written back), so neither x nor the weight is padded. gpb is the largest divisor of G with
    at most block_k rows of K per step and an x block of at most x_block_bytes in VMEM.
    """
    _check(x, qw)
    return _tpu_call(x, qw, None, x.dtype, interpret, "quantized_matmul")


def quantized_matmul_int8_pallas_tpu(xq, x_scale, qw: QuantizedWeight, *, out_dtype=jnp.float32,
                                     interpret: bool = False):
    """TPU (Mosaic) version of `quantized_matmul_int8_ref` (same contract); any group_size.

    `quantized_matmul_pallas_tpu`'s grid and blocks (int8 x rows tile by 32), with int8 x int8 -> int32
    group dots on the MXU (4-bit weights unpacked to int8 in VMEM) and x_scale read from SMEM.
    Checked in TPU interpret mode and by the Mosaic lowering only: not yet run on a TPU.
    """
    x_scale = _check_int8(xq, x_scale, qw, out_dtype)
    return _tpu_call(xq, qw, x_scale, out_dtype, interpret, "quantized_matmul_int8")


def _route(impl: str, kernel: str, qw: QuantizedWeight, integer: bool) -> str:
    """`impl` resolved for `kernel` on this backend: "xla", "tpu" (the compiled TPU variant), "pallas"
    (the compiled GPU kernel) or "interpret" (the GPU kernel, interpreted). "auto" falls back to the
    reference for a group size the GPU kernel cannot take."""
    kind = resolve_impl(impl, kernel, PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return "tpu"
    if kind == "pallas" and impl == "auto":
        _check_weight(qw, kernel)  # a malformed weight gets its own error, not a failed capability test
        if not _kernel_supports(qw, integer):
            return "xla"
    return kind


def quantized_matmul(x, qw: QuantizedWeight, *, impl="auto"):
    """Dispatcher for `quantized_matmul_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.

    The GPU kernel needs group_size a multiple of 16 (8 bits) or 32 (4 bits): otherwise "auto" falls
    back to the reference and "pallas" / "interpret" raise. The TPU kernel takes any group_size.
    """
    route = _route(impl, "quantized_matmul", qw, integer=False)
    if route == "tpu":
        return quantized_matmul_pallas_tpu(x, qw)
    if route == "xla":
        return quantized_matmul_ref(x, qw)
    return quantized_matmul_pallas(x, qw, interpret=route == "interpret")


def quantized_matmul_int8(xq, x_scale, qw: QuantizedWeight, *, out_dtype=jnp.float32, impl="auto"):
    """Dispatcher for `quantized_matmul_int8_ref`'s contract (W8A8 / W4A8: int8 xq [..., K], float scalar
    x_scale -> [..., N] in out_dtype); `impl` as in `pallas_kernels.dispatch`.

    The GPU kernel needs group_size a multiple of 32 (8 bits) or 64 (4 bits): otherwise "auto" falls
    back to the reference and "pallas" / "interpret" raise. The TPU kernel takes any group_size.
    """
    route = _route(impl, "quantized_matmul_int8", qw, integer=True)
    if route == "tpu":
        return quantized_matmul_int8_pallas_tpu(xq, x_scale, qw, out_dtype=out_dtype)
    if route == "xla":
        return quantized_matmul_int8_ref(xq, x_scale, qw, out_dtype)
    return quantized_matmul_int8_pallas(xq, x_scale, qw, out_dtype=out_dtype, interpret=route == "interpret")
