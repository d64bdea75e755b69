"""Weight-only quantized matmul for decode: x (float) times a weight stored as int8 or packed int4.

The weight w [K, N] is quantized symmetrically per group of `group_size` rows along K:
    scale[g, n] = absmax(w[g * group_size : (g + 1) * group_size, n]) / q_max,
    q[k, n] = clip(round(w[k, n] / scale[k // group_size, n]), q_min, q_max),
with (q_min, q_max) = CODE_RANGE[bits]: (-127, 127) for 8 bits and (-8, 7) for 4 bits. 8-bit values are
stored as int8 [K, N]; 4-bit values two per byte along K as uint8 [K / 2, N]: the low nibble holds even
row k, the high nibble odd row k + 1, each a two's-complement 4-bit number (`weights.py`). The other
widths, 2, 3, 5, 6 and 7 bits (two's-complement ranges, e.g. (-4, 3) for 3), are stored as bit planes,
each 8 rows of K in `bits` bytes, and multiply through the reference only (the kernels take 4 and 8 bits;
"auto" routes the rest to "xla"). With `offsets` a weight is asymmetric: w = q * scale + offset.

Decode reads every weight once per token, so the kernel is memory bound: it streams the quantized
bytes (2x / 4x fewer than bfloat16) and dequantizes on chip. `quantized_matmul_pallas` (`triton.py`) is
the GPU kernel, `quantized_matmul_pallas_tpu` (`tpu.py`) the TPU (Mosaic) one.

`quantized_matmul_int8*` is the integer-activation path of Quamba2's W8A8 / W4A8: x arrives as int8 codes
xq [..., K] with a static per-tensor float scale x_scale, and per group g of K
    acc_g[n] = sum_{k in g} xq[k] * q[k, n]            (int8 x int8 products, exact int32 sums),
    out[n] = x_scale * sum_g acc_g[n] * scale[g, n]    (float32),
with one group (group_size == K) for per-channel weights. The same kernels serve both paths: an int8 x
switches their group dots to int8 x int8 -> int32 (4-bit weights unpacked to int8 on chip) and adds the
final x_scale multiply. int32 cannot overflow below 2^31 / 127^2 (about 133k) rows per group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.quantized_matmul.reference import quantized_matmul_int8_ref, quantized_matmul_ref
from pallas_kernels.quantized_matmul.tpu import (
    QuantizedMatmulTPUBlockSizes,
    quantized_matmul_int8_pallas_tpu,
    quantized_matmul_pallas_tpu,
)
from pallas_kernels.quantized_matmul.triton import (
    QuantizedMatmulBlockSizes,
    kernel_supports,
    quantized_matmul_int8_pallas,
    quantized_matmul_pallas,
)
from pallas_kernels.quantized_matmul.weights import (
    CODE_RANGE,
    KERNEL_BITS,
    QuantizedWeight,
    check_weight,
    dequantize_weights,
    offset_term,
    pack_codes,
    pack_int4,
    quantize_weights,
    symmetric_part,
    unpack_int4,
)

__all__ = [
    "CODE_RANGE",
    "QuantizedMatmulBlockSizes",
    "QuantizedMatmulTPUBlockSizes",
    "QuantizedWeight",
    "dequantize_weights",
    "pack_codes",
    "pack_int4",
    "quantize_weights",
    "quantized_matmul",
    "quantized_matmul_int8",
    "quantized_matmul_int8_pallas",
    "quantized_matmul_int8_pallas_tpu",
    "quantized_matmul_int8_ref",
    "quantized_matmul_pallas",
    "quantized_matmul_pallas_tpu",
    "quantized_matmul_ref",
    "unpack_int4",
]

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
BlockSizesArg = QuantizedMatmulBlockSizes | QuantizedMatmulTPUBlockSizes | None


def _route(impl: str, kernel: str, qw: QuantizedWeight, integer: bool, block_sizes: BlockSizesArg) -> str:
    """`impl` resolved for `kernel` on this backend: "xla", "tpu" (the compiled TPU variant), "pallas"
    (the compiled GPU kernel) or "interpret" (the GPU kernel, interpreted). "auto" falls back to the
    reference for a width the kernels do not decode (2, 3, 5, 6, 7 bits) and for a group size the GPU kernel
    cannot take."""
    kind = resolve_impl(impl, kernel, PALLAS_BACKENDS)
    if kind == "pallas" and impl == "auto" and qw.bits not in KERNEL_BITS:
        return "xla"
    if kind == "pallas" and jax.default_backend() == "tpu":
        return "tpu"
    if kind == "pallas" and impl == "auto":
        check_weight(qw, kernel)  # a malformed weight gets its own error, not a failed capability test
        if not kernel_supports(qw, integer, QuantizedMatmulBlockSizes.resolve(block_sizes, kernel)):
            return "xla"
    return kind


def quantized_matmul(x, qw: QuantizedWeight, *, block_sizes: BlockSizesArg = None, impl="auto"):
    """Dispatcher for `quantized_matmul_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.

    The GPU kernel needs group_size a multiple of 16 (8 bits) or 32 (4 bits): otherwise "auto" falls
    back to the reference and "pallas" / "interpret" raise. The TPU kernel takes any group_size.
    `block_sizes` are those of the kernel that runs (None: its defaults).
    """
    route = _route(impl, "quantized_matmul", qw, False, block_sizes)
    if route == "xla":
        return quantized_matmul_ref(x, qw)
    if qw.offsets is not None:  # the kernels multiply the symmetric part; the offsets' share is one small dot
        check_weight(qw, "quantized_matmul")
        out = quantized_matmul(x, symmetric_part(qw), block_sizes=block_sizes, impl=impl)
        return (out.astype(jnp.float32) + offset_term(x, qw)).astype(x.dtype)
    if route == "tpu":
        return quantized_matmul_pallas_tpu(x, qw, block_sizes=block_sizes)
    return quantized_matmul_pallas(x, qw, block_sizes=block_sizes, interpret=route == "interpret")


def quantized_matmul_int8(
    xq, x_scale, qw: QuantizedWeight, *, out_dtype=jnp.float32, block_sizes: BlockSizesArg = None, impl="auto"
):
    """Dispatcher for `quantized_matmul_int8_ref`'s contract (W8A8 / W4A8: int8 xq [..., K], float scalar
    x_scale -> [..., N] in out_dtype); `impl` as in `pallas_kernels.dispatch`.

    The GPU kernel needs group_size a multiple of 32 (8 bits) or 64 (4 bits): otherwise "auto" falls
    back to the reference and "pallas" / "interpret" raise. The TPU kernel takes any group_size.
    `block_sizes` as in `quantized_matmul`.
    """
    route = _route(impl, "quantized_matmul_int8", qw, True, block_sizes)
    if route != "xla" and qw.offsets is not None:  # as in quantized_matmul: kernel on the symmetric part
        check_weight(qw, "quantized_matmul_int8")
        out = quantized_matmul_int8(
            xq, x_scale, symmetric_part(qw), out_dtype=jnp.float32, block_sizes=block_sizes, impl=impl
        )
        return (out + jnp.asarray(x_scale, jnp.float32) * offset_term(xq, qw)).astype(out_dtype)
    if route == "tpu":
        return quantized_matmul_int8_pallas_tpu(xq, x_scale, qw, out_dtype=out_dtype, block_sizes=block_sizes)
    if route == "xla":
        return quantized_matmul_int8_ref(xq, x_scale, qw, out_dtype)
    return quantized_matmul_int8_pallas(
        xq, x_scale, qw, out_dtype=out_dtype, block_sizes=block_sizes, interpret=route == "interpret"
    )
