"""Quantized matmul references: weight-only (float x) and integer-activation (int8 x, W8A8 / W4A8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.weights import (
    QuantizedWeight,
    check_inputs,
    check_int8_inputs,
    dequantize_weights,
    int_values,
    offset_term,
)


def quantized_matmul_ref(x, qw: QuantizedWeight):
    """x: [..., K] -> x @ dequantize_weights(qw): [..., N] in x's dtype, float32 accumulation."""
    check_inputs(x, qw)
    out = jnp.matmul(x.astype(jnp.float32), dequantize_weights(qw), precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def quantized_matmul_int8_ref(xq, x_scale, qw: QuantizedWeight, out_dtype=jnp.float32):
    """xq: int8 [..., K], x_scale: float scalar -> [..., N] in out_dtype:
    x_scale * sum_g (xq_g @ q_g in int32) * scale_g, summed over groups g in float32 (plus, with offsets,
    x_scale * sum_g (sum of xq_g) * offset_g).

    One batched int8 x int8 -> int32 dot over the groups: exact, but its [K / group_size, M, N] int32
    result is materialized, so this is sized for decode and checks rather than long prefills.
    """
    x_scale = check_int8_inputs(xq, x_scale, qw, out_dtype)
    k, n = qw.shape
    groups = k // qw.group_size
    q = int_values(qw).astype(jnp.int8).reshape(groups, qw.group_size, n)
    xg = xq.reshape(-1, groups, qw.group_size)
    acc = jax.lax.dot_general(xg, q, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # [G, M, N]
    out = jnp.sum(acc.astype(jnp.float32) * qw.scales.astype(jnp.float32)[:, None, :], axis=0)
    out = out.reshape(*xq.shape[:-1], n)
    if qw.offsets is not None:
        out = out + offset_term(xq, qw)
    return (x_scale * out).astype(out_dtype)
