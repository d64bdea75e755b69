"""Weight-only quantized matmul: quantization (error bound, int4 packing), the reference against a plain
matmul with the dequantized weight, and the Pallas kernel in interpret mode against the reference on
hypothesis-drawn shapes, bits and dtypes; jit, clear errors, and the Triton lowering on decode shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_triton

from pallas_kernels.gpu_params import QUANTIZED_MATMUL_BLOCK_N
from pallas_kernels.quantized_matmul import (QuantizedWeight, dequantize_weights, pack_int4, quantize_weights,
                                             quantized_matmul, quantized_matmul_pallas, quantized_matmul_ref,
                                             unpack_int4)

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
BITS = st.sampled_from([4, 8])
# Jitted: one compile per drawn shape instead of one per eager op (several seconds on this CPU).
quantize = jax.jit(quantize_weights, static_argnums=(1, 2, 3))
dequantize = jax.jit(dequantize_weights)
reference = jax.jit(quantized_matmul_ref)
kernel = jax.jit(functools.partial(quantized_matmul, impl="interpret"))


def _inputs(seed, lead, k, n, dtype):
    """x [*lead, K] scaled so outputs are O(1), w [K, N] standard normal."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k), np.float32) / np.sqrt(k), dtype)
    return x, jnp.asarray(rng.standard_normal((k, n), np.float32))


@settings(max_examples=12, deadline=None)
@given(bits=BITS, group=st.sampled_from([2, 8, 32, 128]), groups=st.integers(1, 4), n=st.integers(1, 70),
       scale_dtype=DTYPES, seed=st.integers(0, 2**16))
def test_quantization_error_is_at_most_half_a_step(bits, group, groups, n, scale_dtype, seed):
    k = group * groups
    w = 3.0 * np.random.default_rng(seed).standard_normal((k, n), np.float32)
    w[:group] = 0.0  # an all-zero group: scale 0, no division by zero
    qw = quantize(jnp.asarray(w), bits, group, scale_dtype)
    assert qw.values.shape == ((k, n) if bits == 8 else (k // 2, n)) and qw.scales.shape == (groups, n)
    assert qw.scales.dtype == scale_dtype and qw.shape == (k, n)
    deq = np.asarray(dequantize(qw))
    step = np.repeat(np.asarray(qw.scales, np.float32), group, axis=0)
    assert deq.dtype == np.float32 and np.isfinite(deq).all()
    assert (np.abs(w - deq) <= step / 2 + 1e-6 * np.abs(w)).all()  # slack: float32 rounding of q * scale
    np.testing.assert_array_equal(deq[:group], 0.0)


def test_int4_packing_round_trips_extremes_through_reference_and_kernel():
    q = jnp.array([[-8, 7, 0, -1], [7, -8, 1, 0]] * 16, jnp.int32)  # [32, 4]: both nibbles hit -8 and 7
    values = pack_int4(q)
    assert values.dtype == jnp.uint8 and values.shape == (16, 4)
    np.testing.assert_array_equal(np.asarray(values[0]), [0x78, 0x87, 0x10, 0x0F])
    np.testing.assert_array_equal(np.asarray(unpack_int4(values)), np.asarray(q))
    qw = QuantizedWeight(values, jnp.ones((1, 4), jnp.float32), bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(dequantize_weights(qw)), np.asarray(q, np.float32))
    x = jnp.eye(32, dtype=jnp.float32)[:3]  # picks rows 0, 1, 2 of q
    np.testing.assert_array_equal(np.asarray(quantized_matmul(x, qw, impl="interpret")), np.asarray(q[:3]))


@settings(max_examples=8, deadline=None)
@given(bits=BITS, lead=st.sampled_from([(1,), (3,), (2, 5)]), groups=st.integers(1, 3), n=st.integers(1, 50),
       seed=st.integers(0, 2**16))
def test_reference_is_matmul_with_the_dequantized_weight(bits, lead, groups, n, seed):
    x, w = _inputs(seed, lead, 32 * groups, n, jnp.float32)
    qw = quantize(w, bits, 32)
    got = reference(x, qw)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    want = np.asarray(x, np.float64) @ np.asarray(dequantize(qw), np.float64)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(bits=BITS, m=st.integers(1, 40), group=st.sampled_from([32, 64, 128]), groups=st.integers(1, 3),
       n=st.sampled_from([1, 24, QUANTIZED_MATMUL_BLOCK_N, 100, 2 * QUANTIZED_MATMUL_BLOCK_N + 3]),
       dtype=DTYPES, scale_dtype=DTYPES, seed=st.integers(0, 2**16))
def test_kernel_matches_reference(bits, m, group, groups, n, dtype, scale_dtype, seed):
    x, w = _inputs(seed, (m,), group * groups, n, dtype)
    qw = quantize(w, bits, group, scale_dtype)
    got = kernel(x, qw)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, reference(x, qw), dtype)


def test_dispatcher_runs_under_jit_with_static_metadata():
    x, w = _inputs(0, (2, 3), 64, 40, jnp.bfloat16)
    qw = quantize(w, 4, 32)
    assert len(jax.tree_util.tree_leaves(qw)) == 2  # bits and group_size are metadata, not leaves
    got = jax.jit(lambda x, qw: quantized_matmul(x, qw, impl="interpret"))(x, qw)
    assert got.shape == (2, 3, 40)
    assert_close(got, reference(x, qw), jnp.bfloat16)


def test_clear_errors():
    w = jnp.ones((64, 8))
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        quantize_weights(w, bits=3)
    with pytest.raises(ValueError, match=r"K \(64\) must be a multiple of group_size \(48\)"):
        quantize_weights(w, group_size=48)
    with pytest.raises(ValueError, match="K must be even, got K=3"):
        quantize_weights(jnp.ones((3, 8)), bits=4, group_size=1)
    for bad in (0, -32, 2.0, True):
        with pytest.raises(ValueError, match=f"group_size must be a positive int, got {bad!r}"):
            quantize_weights(w, group_size=bad)
    qw = quantize(w, 8, 32)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 64\] \(the weight's K\), got \(2, 32\)"):
        quantized_matmul(jnp.ones((2, 32)), qw)
    with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
        quantized_matmul(jnp.ones((2, 64)), qw, impl="pallas")
    small_groups = quantize(w, 4, 16)  # 8 packed rows per group: below Triton's dot minimum
    with pytest.raises(ValueError, match="group_size to be a multiple of 32 for 4 bits, got 16"):
        quantized_matmul(jnp.ones((2, 64)), small_groups, impl="interpret")
    np.testing.assert_allclose(np.asarray(quantized_matmul(jnp.ones((2, 64)), small_groups)), 64.0, rtol=1e-6)


@pytest.mark.parametrize("k, n", [(576, 1536), (4096, 11008)])  # SmolLM2's MLP up, Llama-7B's MLP up
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_lowers_to_triton_for_decode_shapes(k, n, bits):
    for m, x_dtype, group, scale_dtype in ((1, jnp.bfloat16, 64, jnp.bfloat16), (16, jnp.float32, 32, jnp.float32)):
        rows = k if bits == 8 else k // 2
        qw = QuantizedWeight(jax.ShapeDtypeStruct((rows, n), jnp.int8 if bits == 8 else jnp.uint8),
                             jax.ShapeDtypeStruct((k // group, n), scale_dtype), bits, group)
        assert_lowers_to_triton(quantized_matmul_pallas, jax.ShapeDtypeStruct((m, k), x_dtype), qw)
