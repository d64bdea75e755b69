"""Quantized matmul references: quantization (error bound, all-zero groups), the weight-only reference
against a plain matmul with the dequantized weight, and the integer-activation (W8A8 / W4A8) reference
against an exact float64 numpy computation (integer group sums are exact) and against the weight-only
path on dequantized activations; clear errors of the quantizer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import random_int8_inputs

from pallas_kernels.quantized_matmul import (
    CODE_RANGE,
    QuantizedWeight,
    dequantize_weights,
    quantize_weights,
    quantized_matmul,
    quantized_matmul_int8_ref,
    quantized_matmul_ref,
)

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
BITS = st.sampled_from([4, 8])
# Jitted: one compile per drawn shape instead of one per eager op (several seconds on this CPU).
quantize = jax.jit(quantize_weights, static_argnums=(1, 2, 3))
dequantize = jax.jit(dequantize_weights)
reference = jax.jit(quantized_matmul_ref)
int8_reference = jax.jit(quantized_matmul_int8_ref, static_argnums=3)


def _codes(qw: QuantizedWeight) -> np.ndarray:
    """The weight's integer codes int64 [K, N], unpacked in numpy (independently of the module)."""
    v = np.asarray(qw.values).astype(np.int64)
    if qw.bits == 8:
        return v
    if qw.bits != 4:  # bit planes: each 8 rows of K in `bits` bytes, byte p holding bit p of each row's code
        planes = v.reshape(-1, qw.bits, 1, v.shape[1]) >> np.arange(8)[None, None, :, None] & 1
        codes = (planes << np.arange(qw.bits)[None, :, None, None]).sum(1).reshape(-1, v.shape[1])
        sign = 1 << (qw.bits - 1)
        return (codes ^ sign) - sign
    nibbles = np.stack([v & 0xF, v >> 4], axis=1).reshape(2 * v.shape[0], v.shape[1])
    return (nibbles ^ 8) - 8


def _exact(xq, x_scale, qw: QuantizedWeight):
    """(x_scale * sum_g acc_g * scale_g, sum_g |x_scale * acc_g * scale_g|) in float64, [*lead, N]; acc_g is
    the exact int64 group sum."""
    (k, n), g = qw.shape, qw.group_size
    acc = np.einsum("mgk,gkn->mgn", np.asarray(xq, np.int64).reshape(-1, k // g, g), _codes(qw).reshape(k // g, g, n))
    terms = float(x_scale) * acc * np.asarray(qw.scales, np.float64)[None]
    lead = xq.shape[:-1]
    return terms.sum(1).reshape(*lead, n), np.abs(terms).sum(1).reshape(*lead, n)


@settings(max_examples=12, deadline=None)
@given(
    bits=BITS,
    group=st.sampled_from([2, 8, 32, 128]),
    groups=st.integers(1, 4),
    n=st.integers(1, 70),
    scale_dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
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


@settings(max_examples=8, deadline=None)
@given(
    bits=BITS,
    lead=st.sampled_from([(1,), (3,), (2, 5)]),
    groups=st.integers(1, 3),
    n=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_reference_is_matmul_with_the_dequantized_weight(bits, lead, groups, n, seed):
    rng = np.random.default_rng(seed)
    k = 32 * groups
    x = jnp.asarray(rng.standard_normal((*lead, k), np.float32) / np.sqrt(k))
    qw = quantize(jnp.asarray(rng.standard_normal((k, n), np.float32)), bits, 32)
    got = reference(x, qw)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    want = np.asarray(x, np.float64) @ np.asarray(dequantize(qw), np.float64)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    bits=BITS,
    group=st.sampled_from([2, 16, 32, 48, None]),
    groups=st.integers(1, 3),
    lead=st.sampled_from([(1,), (7,), (3, 5), (2, 1, 3)]),
    n=st.integers(1, 40),
    scale_dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_int8_reference_equals_exact_float64(bits, group, groups, lead, n, scale_dtype, seed):
    k = 64 if group is None else group * groups  # None: per-channel, one group of all K rows
    xq, x_scale, qw = random_int8_inputs(seed, lead, k, n, bits, group or k, scale_dtype)
    got = int8_reference(xq, x_scale, qw, jnp.float32)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    want, magnitude = _exact(xq, x_scale, qw)
    # Integer sums are exact; what is left is float32 rounding of a few products and a sum over groups.
    assert (np.abs(np.asarray(got, np.float64) - want) <= 1e-6 * (qw.scales.shape[0] + 2) * magnitude).all()


@settings(max_examples=6, deadline=None)
@given(
    bits=BITS,
    lead=st.sampled_from([(1,), (5,), (2, 3)]),
    groups=st.integers(1, 3),
    n=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_int8_reference_matches_weight_only_path_on_dequantized_activations(bits, lead, groups, n, seed):
    xq, x_scale, qw = random_int8_inputs(seed, lead, 32 * groups, n, bits, 32)
    x = xq.astype(jnp.float32) * x_scale
    np.testing.assert_allclose(
        np.asarray(int8_reference(xq, x_scale, qw, jnp.float32)),
        np.asarray(quantized_matmul_ref(x, qw)),
        atol=2e-5,
        rtol=2e-5,
    )


@settings(max_examples=14, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group=st.sampled_from([8, 16, 64]),
    groups=st.integers(1, 3),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_every_width_from_2_to_8_bits_stores_its_codes_and_multiplies(bits, symmetric, group, groups, n, seed):
    """2-8 bits, absmax or min-max: the stored bytes are bits/8 per weight, the codes (unpacked here in numpy)
    lie in CODE_RANGE and dequantize within half a step, and the product is x @ the dequantized weight."""
    rng = np.random.default_rng(seed)
    k = group * groups
    w = (rng.standard_normal((k, n)) + (0 if symmetric else 1.5)).astype(np.float32)
    w[:group, 0] = 0.25  # a constant column of a group: scale 0 under min-max, still exact
    qw = quantize_weights(jnp.asarray(w), bits, group, symmetric=symmetric)
    assert qw.shape == (k, n) and qw.values.size == k * n * bits // 8 and (qw.offsets is None) == symmetric
    codes = _codes(qw)
    q_min, q_max = CODE_RANGE[bits]
    assert codes.min() >= q_min and codes.max() <= q_max
    scales = np.repeat(np.asarray(qw.scales, np.float64), group, axis=0)
    offsets = 0.0 if symmetric else np.repeat(np.asarray(qw.offsets, np.float64), group, axis=0)
    deq = codes * scales + offsets
    np.testing.assert_allclose(np.asarray(dequantize(qw)), deq, rtol=1e-6, atol=1e-6)
    assert (np.abs(w - deq) <= scales / 2 + 1e-5).all()
    if not symmetric:
        np.testing.assert_allclose(deq[:group, 0], 0.25, rtol=1e-6)
    x = jnp.asarray(rng.standard_normal((3, k), np.float32))
    want = np.asarray(x, np.float64) @ deq
    np.testing.assert_allclose(np.asarray(quantized_matmul(x, qw)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits, symmetric", [(3, False), (5, True), (2, True)])
def test_int8_activations_against_bit_plane_weights_are_exact(bits, symmetric):
    """W3A8 / W5A8: the integer path's group sums of int8 activations times the unpacked codes (plus the offsets'
    share) against numpy int64."""
    rng = np.random.default_rng(bits)
    qw = quantize_weights(jnp.asarray(rng.standard_normal((64, 12)), jnp.float32), bits, 16, symmetric=symmetric)
    xq = jnp.asarray(rng.integers(-127, 128, (3, 64)), jnp.int8)
    want, scale = _exact(xq, 0.02, qw)
    if not symmetric:
        sums = np.asarray(xq, np.int64).reshape(3, 4, 16).sum(-1)
        want = want + 0.02 * sums @ np.asarray(qw.offsets, np.float64)
    got = np.asarray(int8_reference(xq, 0.02, qw, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale.max())


def test_the_kernels_refuse_widths_other_than_4_and_8_by_name():
    qw = quantize_weights(jnp.ones((64, 128)), bits=3, group_size=32)
    x = jnp.ones((2, 64))
    np.testing.assert_allclose(np.asarray(quantized_matmul(x, qw)), np.asarray(x @ dequantize_weights(qw)), rtol=1e-6)
    with pytest.raises(ValueError, match="the Pallas kernels take 4- or 8-bit weights, got 3 bits; use impl='xla'"):
        quantized_matmul(x, qw, impl="interpret")


def test_quantizer_gives_clear_errors():
    w = jnp.ones((64, 8))
    for bad in (1, 9, 16):
        with pytest.raises(ValueError, match=f"bits must be an int in 2..8, got {bad}"):
            quantize_weights(w, bits=bad)
    with pytest.raises(ValueError, match="3-bit weights pack 8 rows into 3 bytes, so K must be a multiple of 8"):
        quantize_weights(jnp.ones((12, 8)), bits=3, group_size=4)
    with pytest.raises(ValueError, match=r"K \(64\) must be a multiple of group_size \(48\)"):
        quantize_weights(w, group_size=48)
    with pytest.raises(ValueError, match="K must be even, got K=3"):
        quantize_weights(jnp.ones((3, 8)), bits=4, group_size=1)
    for bad in (0, -32, 2.0, True):
        with pytest.raises(ValueError, match=f"group_size must be a positive int, got {bad!r}"):
            quantize_weights(w, group_size=bad)
