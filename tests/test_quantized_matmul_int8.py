"""Integer-activation quantized matmul (W8A8 / W4A8): the reference against an exact float64 numpy computation
(integer group sums are exact), against the weight-only path on dequantized activations, and exact beyond
float32's 24 bits; the GPU kernel in interpret mode and the TPU variant in TPU interpret mode against the
reference on hypothesis-drawn shapes; dispatch (jit, TPU route, "auto" fallback), clear errors, and the
Triton / Mosaic lowerings on decode shapes.
"""

import functools
import importlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, assert_lowers_to_triton

from pallas_kernels.gpu_params import QUANTIZED_MATMUL_BLOCK_N
from pallas_kernels.quantized_matmul import (QuantizedWeight, pack_int4, quantized_matmul_int8,
                                             quantized_matmul_int8_pallas, quantized_matmul_int8_pallas_tpu,
                                             quantized_matmul_int8_ref, quantized_matmul_ref)
from pallas_kernels.tpu_params import QUANTIZED_MATMUL_TPU

qmm = importlib.import_module("pallas_kernels.quantized_matmul")  # the package exports a function of that name

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
BITS = st.sampled_from([4, 8])
S = jax.ShapeDtypeStruct
# Jitted: one compile per drawn shape instead of one per eager op.
reference = jax.jit(quantized_matmul_int8_ref, static_argnums=3)
kernel = jax.jit(functools.partial(quantized_matmul_int8, impl="interpret"), static_argnames="out_dtype")


def _weight(rng, k, n, bits, group, scale_dtype=jnp.float32, codes=None):
    """A QuantizedWeight of random codes (full range, extremes included) and per-group scales ~ 1 / 127."""
    if codes is None:
        low, high = (-127, 127) if bits == 8 else (-8, 7)
        codes = rng.integers(low, high + 1, (k, n))
    values = jnp.asarray(codes, jnp.int8) if bits == 8 else pack_int4(jnp.asarray(codes))
    scales = jnp.asarray(rng.uniform(0.5, 1.5, (k // group, n)) / 127, scale_dtype)
    return QuantizedWeight(values, scales, bits, group)


def _inputs(seed, lead, k, n, bits, group, scale_dtype=jnp.float32):
    """xq int8 [*lead, K] over the full range; x_scale (float32) so outputs are O(1); the weight."""
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.integers(-127, 128, (*lead, k)), jnp.int8)
    x_scale = np.float32(rng.uniform(0.5, 1.5) / (127 * np.sqrt(k)))
    return xq, x_scale, _weight(rng, k, n, bits, group, scale_dtype)


def _codes(qw: QuantizedWeight) -> np.ndarray:
    """The weight's integer codes int64 [K, N], unpacked in numpy (independently of the module)."""
    v = np.asarray(qw.values).astype(np.int64)
    if qw.bits == 8:
        return v
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


@settings(max_examples=10, deadline=None)
@given(bits=BITS, group=st.sampled_from([2, 16, 32, 48, None]), groups=st.integers(1, 3),
       lead=st.sampled_from([(1,), (7,), (3, 5), (2, 1, 3)]), n=st.integers(1, 40), scale_dtype=DTYPES,
       seed=st.integers(0, 2**16))
def test_reference_equals_exact_float64(bits, group, groups, lead, n, scale_dtype, seed):
    k = 64 if group is None else group * groups  # None: per-channel, one group of all K rows
    xq, x_scale, qw = _inputs(seed, lead, k, n, bits, group or k, scale_dtype)
    got = reference(xq, x_scale, qw, jnp.float32)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    want, magnitude = _exact(xq, x_scale, qw)
    # Integer sums are exact; what is left is float32 rounding of a few products and a sum over groups.
    assert (np.abs(np.asarray(got, np.float64) - want) <= 1e-6 * (qw.scales.shape[0] + 2) * magnitude).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_accumulation_is_exact_beyond_float32(bits):
    """One group of K same-sign products: sums exceed 2^24, where float32 accumulation would round, but
    with unit scales each output is the float32 rounding of the exact integer sum, in reference and kernel."""
    rng = np.random.default_rng(bits)
    k, n = (4096 if bits == 8 else 32768), 8  # |xq * q| <= 127 * 127 or 127 * 8
    xq = jnp.asarray(rng.integers(100, 128, (3, k)), jnp.int8)
    codes = rng.integers(90, 128, (k, n)) if bits == 8 else rng.integers(-8, -5, (k, n))
    qw = _weight(rng, k, n, bits, k, codes=codes)
    qw = QuantizedWeight(qw.values, jnp.ones_like(qw.scales), bits, k)
    exact = np.asarray(xq, np.int64) @ codes
    assert np.abs(exact).min() > 2**24
    for got in (reference(xq, 1.0, qw, jnp.float32), kernel(xq, 1.0, qw)):
        np.testing.assert_array_equal(np.asarray(got), exact.astype(np.float32))


def test_int4_extremes_and_per_group_scales():
    """Both nibbles hit -8 and 7 against xq = +-127, two groups with scales 1 and 2, x_scale 0.5."""
    q = np.array([[-8, 7, 0, -1], [7, -8, 1, 0]] * 64)  # [128, 4]
    qw = QuantizedWeight(pack_int4(jnp.asarray(q)), jnp.array([[1.0] * 4, [2.0] * 4], jnp.float32), 4, 64)
    xq = np.zeros((3, 128), np.int8)
    xq[0, 0], xq[1, 1], xq[2, [64, 127]] = 127, -127, (127, -127)
    want = 0.5 * np.array([127 * q[0], -127 * q[1], 2 * 127 * (q[64] - q[127])], np.float32)
    for impl in ("xla", "interpret"):
        np.testing.assert_array_equal(np.asarray(quantized_matmul_int8(jnp.asarray(xq), 0.5, qw, impl=impl)), want)


@settings(max_examples=6, deadline=None)
@given(bits=BITS, lead=st.sampled_from([(1,), (5,), (2, 3)]), groups=st.integers(1, 3), n=st.integers(1, 50),
       seed=st.integers(0, 2**16))
def test_reference_matches_weight_only_path_on_dequantized_activations(bits, lead, groups, n, seed):
    xq, x_scale, qw = _inputs(seed, lead, 32 * groups, n, bits, 32)
    x = xq.astype(jnp.float32) * x_scale
    np.testing.assert_allclose(np.asarray(reference(xq, x_scale, qw, jnp.float32)),
                               np.asarray(quantized_matmul_ref(x, qw)), atol=2e-5, rtol=2e-5)


@settings(max_examples=10, deadline=None)
@given(bits=BITS, m=st.integers(1, 40), rows=st.sampled_from([32, 64, 96, 288]), groups=st.integers(1, 3),
       per_channel=st.booleans(),
       n=st.sampled_from([1, 24, QUANTIZED_MATMUL_BLOCK_N, 100, 2 * QUANTIZED_MATMUL_BLOCK_N + 3]),
       out_dtype=DTYPES, scale_dtype=DTYPES, seed=st.integers(0, 2**16))
def test_kernel_matches_reference(bits, m, rows, groups, per_channel, n, out_dtype, scale_dtype, seed):
    """Stored rows per group are a multiple of 32 (the kernel's need); 96 and 288 are read in 3 and 9
    chunks of 32, and per-channel weights have one group of all K rows."""
    group = rows if bits == 8 else 2 * rows
    k = group * groups
    xq, x_scale, qw = _inputs(seed, (m,), k, n, bits, k if per_channel else group, scale_dtype)
    got = kernel(xq, x_scale, qw, out_dtype=out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    assert_close(got, reference(xq, x_scale, qw, out_dtype), out_dtype)


def test_dispatcher_under_jit_with_traced_scale_and_leading_dims():
    xq, x_scale, qw = _inputs(0, (2, 3), 128, 40, 4, 64)
    for impl in ("xla", "interpret", "auto"):
        got = jax.jit(lambda xq, s, qw: quantized_matmul_int8(xq, s, qw, out_dtype=jnp.bfloat16, impl=impl))(
            xq, jnp.float32(x_scale), qw)
        assert got.shape == (2, 3, 40) and got.dtype == jnp.bfloat16
        assert_close(got, reference(xq, x_scale, qw, jnp.bfloat16), jnp.bfloat16)


@settings(max_examples=4, deadline=None)
@given(bits=BITS, m=st.sampled_from([1, 5, 40]), group=st.sampled_from([2, 16, 48, 64]), groups=st.integers(1, 3),
       n=st.sampled_from([1, 24, 130]), small=st.booleans(), seed=st.integers(0, 2**16))
def test_tpu_kernel_matches_reference(bits, m, group, groups, n, small, seed):
    """Small caps (16 rows -> one 32-row int8 tile, 128 columns, 64 rows of K per step) make tiny shapes take
    partial M / N blocks and several K steps."""
    xq, x_scale, qw = _inputs(seed, (m,), group * groups, n, bits, group)
    caps = dict(block_m=16, block_n=128, block_k=64) if small else {}
    with mock.patch.dict(QUANTIZED_MATMUL_TPU, caps):
        got = quantized_matmul_int8_pallas_tpu(xq, x_scale, qw, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert_close(got, reference(xq, x_scale, qw, jnp.float32), jnp.float32)


def test_tpu_dispatch_under_jit():
    """With the backend reported as TPU, "pallas" routes to the TPU variant (here interpreted), even for a
    group size the GPU kernel rejects."""
    xq, x_scale, qw = _inputs(1, (2, 3), 96, 40, 4, 16)
    calls = []

    def interpreted(*a, **kw):
        calls.append(1)
        return quantized_matmul_int8_pallas_tpu(*a, **kw, interpret=True)

    with (mock.patch.object(jax, "default_backend", lambda: "tpu"),
          mock.patch.object(qmm, "quantized_matmul_int8_pallas_tpu", interpreted)):
        got = jax.jit(lambda xq, s, qw: quantized_matmul_int8(xq, s, qw, impl="pallas"))(xq, x_scale, qw)
    assert calls == [1] and got.shape == (2, 3, 40)
    assert_close(got, reference(xq, x_scale, qw, jnp.float32), jnp.float32)


def test_auto_on_gpu_falls_back_to_the_reference_for_small_groups():
    xq, x_scale, qw = _inputs(2, (4,), 64, 8, 4, 32)  # 16 packed rows per group: too few for int8 dots
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):  # compiling Triton here would fail
        got = quantized_matmul_int8(xq, x_scale, qw)
    assert_close(got, reference(xq, x_scale, qw, jnp.float32), jnp.float32)


def test_clear_errors():
    rng = np.random.default_rng(0)
    qw = _weight(rng, 64, 8, 8, 32)
    xq = jnp.ones((2, 64), jnp.int8)
    name = "quantized_matmul_int8"
    cases = [
        ((jnp.ones((2, 64)), 0.1, qw), "xq must be int8 activation codes, got float32"),
        ((xq.astype(jnp.int32), 0.1, qw), "xq must be int8 activation codes, got int32"),
        ((jnp.ones((2, 32), jnp.int8), 0.1, qw), r"xq must have shape \[..., 64\] \(the weight's K\), got \(2, 32\)"),
        ((xq, jnp.ones((2,)), qw), r"x_scale must be a floating-point scalar .* got float32 with shape \(2,\)"),
        ((xq, 1, qw), r"x_scale must be a floating-point scalar .* got int32 with shape \(\)"),
        ((xq, 0.1, QuantizedWeight(qw.values, qw.scales, 3, 32)), "bits must be 4 or 8, got 3"),
        ((xq, 0.1, QuantizedWeight(qw.values, qw.scales, 8, 48)), r"K \(64\) must be a multiple of group_size \(48\)"),
        ((xq, 0.1, QuantizedWeight(qw.values, qw.scales[:1], 8, 32)), r"scales must have shape \(2, 8\), got \(1, 8\)"),
        ((xq, 0.1, QuantizedWeight(qw.values.astype(jnp.uint8), qw.scales, 8, 32)), "8-bit values must be int8"),
    ]
    for args, message in cases:
        for impl in ("xla", "interpret"):
            with pytest.raises(ValueError, match=f"{name}: {message}"):
                quantized_matmul_int8(*args, impl=impl)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point dtype, got int32"):
        quantized_matmul_int8(xq, 0.1, qw, out_dtype=jnp.int32)
    with pytest.raises(ValueError, match=f"{name}: no compiled Pallas kernel for backend 'cpu'"):
        quantized_matmul_int8(xq, 0.1, qw, impl="pallas")
    with pytest.raises(ValueError, match=f"{name}: unknown impl 'triton'"):
        quantized_matmul_int8(xq, 0.1, qw, impl="triton")
    small_groups = _weight(rng, 64, 8, 4, 32)
    with pytest.raises(ValueError, match="needs group_size to be a multiple of 64 for 4 bits, got 32; use impl='xla'"):
        quantized_matmul_int8(xq, 0.1, small_groups, impl="interpret")
    with pytest.raises(ValueError, match="needs group_size to be a multiple of 32 for 8 bits, got 48"):
        quantized_matmul_int8(jnp.ones((2, 96), jnp.int8), 0.1, _weight(rng, 96, 8, 8, 48), impl="interpret")


@pytest.mark.parametrize("k, n", [(576, 1536), (4096, 11008)])  # SmolLM2's MLP up, Llama-7B's MLP up
@pytest.mark.parametrize("bits", [4, 8])
def test_kernels_lower_to_triton_and_mosaic(k, n, bits):
    """Decode (m 1) and verification-sized (m 16) rows, groups of 64 and per-channel (one group of all K
    rows: 9 chunks of 64 rows for K 576, 16 of 256 for K 4096)."""
    for m, group, out_dtype in ((1, 64, jnp.float32), (16, k, jnp.bfloat16)):
        rows = k if bits == 8 else k // 2
        qw = QuantizedWeight(S((rows, n), jnp.int8 if bits == 8 else jnp.uint8), S((k // group, n), jnp.float32),
                             bits, group)
        args = (S((m, k), jnp.int8), S((), jnp.float32), qw)
        assert_lowers_to_triton(lambda xq, s, qw: quantized_matmul_int8_pallas(xq, s, qw, out_dtype=out_dtype), *args)
        assert_lowers_to_mosaic_tpu(
            lambda xq, s, qw: quantized_matmul_int8_pallas_tpu(xq, s, qw, out_dtype=out_dtype), *args)
