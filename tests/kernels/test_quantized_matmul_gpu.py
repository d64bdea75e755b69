"""The Pallas (Triton) quantized matmul kernel in interpret mode against its references, on hypothesis-drawn
shapes, bits, group sizes, dtypes and block sizes: weight-only (float x) and integer-activation (int8 x,
W8A8 / W4A8, exact beyond float32's 24 bits); int4 extremes; jit, the "auto" fallback, clear errors, and
the Triton lowering on decode shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import (
    IMPL,
    INTERPRET,
    assert_close,
    assert_lowers_to_triton,
    random_int8_inputs,
    random_quantized_weight,
)

from pallas_kernels.quantized_matmul import (
    QuantizedMatmulBlockSizes,
    QuantizedMatmulTPUBlockSizes,
    QuantizedWeight,
    dequantize_weights,
    pack_int4,
    quantize_weights,
    quantized_matmul,
    quantized_matmul_int8,
    quantized_matmul_int8_pallas,
    quantized_matmul_int8_ref,
    quantized_matmul_pallas,
    quantized_matmul_ref,
    unpack_int4,
)

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
BITS = st.sampled_from([4, 8])
S = jax.ShapeDtypeStruct
BLOCK_N = QuantizedMatmulBlockSizes().block_n
# Small blocks: 16 columns per program and K chunks of 32 stored rows, so short groups take several chunks.
SMALL_BLOCKS = QuantizedMatmulBlockSizes(block_n=16, block_k=32)
# Jitted: one compile per drawn shape instead of one per eager op (several seconds on this CPU).
quantize = jax.jit(quantize_weights, static_argnums=(1, 2, 3))
reference = jax.jit(quantized_matmul_ref)
kernel = jax.jit(functools.partial(quantized_matmul, impl=IMPL), static_argnames="block_sizes")
int8_reference = jax.jit(quantized_matmul_int8_ref, static_argnums=3)
int8_kernel = jax.jit(functools.partial(quantized_matmul_int8, impl=IMPL), static_argnames=("out_dtype", "block_sizes"))


def _inputs(seed, lead, k, n, dtype):
    """x [*lead, K] scaled so outputs are O(1), w [K, N] standard normal."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k), np.float32) / np.sqrt(k), dtype)
    return x, jnp.asarray(rng.standard_normal((k, n), np.float32))


@settings(max_examples=12, deadline=None)
@given(
    bits=BITS,
    m=st.integers(1, 40),
    group=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 3),
    n=st.sampled_from([1, 24, BLOCK_N, 100, 2 * BLOCK_N + 3]),
    dtype=DTYPES,
    scale_dtype=DTYPES,
    blocks=st.sampled_from([None, SMALL_BLOCKS]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(bits, m, group, groups, n, dtype, scale_dtype, blocks, seed):
    x, w = _inputs(seed, (m,), group * groups, n, dtype)
    qw = quantize(w, bits, group, scale_dtype)
    got = kernel(x, qw, block_sizes=blocks)
    assert got.shape == (m, n) and got.dtype == dtype
    assert_close(got, reference(x, qw), dtype)


@settings(max_examples=10, deadline=None)
@given(
    bits=BITS,
    m=st.integers(1, 40),
    rows=st.sampled_from([32, 64, 96, 288]),
    groups=st.integers(1, 3),
    per_channel=st.booleans(),
    n=st.sampled_from([1, 24, BLOCK_N, 100, 2 * BLOCK_N + 3]),
    out_dtype=DTYPES,
    scale_dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_int8_kernel_matches_reference(bits, m, rows, groups, per_channel, n, out_dtype, scale_dtype, seed):
    """Stored rows per group are a multiple of 32 (the kernel's need); 96 and 288 are read in 3 and 9
    chunks of 32, and per-channel weights have one group of all K rows."""
    group = rows if bits == 8 else 2 * rows
    k = group * groups
    xq, x_scale, qw = random_int8_inputs(seed, (m,), k, n, bits, k if per_channel else group, scale_dtype)
    got = int8_kernel(xq, x_scale, qw, out_dtype=out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    assert_close(got, int8_reference(xq, x_scale, qw, out_dtype), out_dtype)


def test_int4_packing_round_trips_extremes_through_reference_and_kernel():
    q = jnp.array([[-8, 7, 0, -1], [7, -8, 1, 0]] * 16, jnp.int32)  # [32, 4]: both nibbles hit -8 and 7
    values = pack_int4(q)
    assert values.dtype == jnp.uint8 and values.shape == (16, 4)
    np.testing.assert_array_equal(np.asarray(values[0]), [0x78, 0x87, 0x10, 0x0F])
    np.testing.assert_array_equal(np.asarray(unpack_int4(values)), np.asarray(q))
    qw = QuantizedWeight(values, jnp.ones((1, 4), jnp.float32), bits=4, group_size=32)
    np.testing.assert_array_equal(np.asarray(dequantize_weights(qw)), np.asarray(q, np.float32))
    x = jnp.eye(32, dtype=jnp.float32)[:3]  # picks rows 0, 1, 2 of q
    np.testing.assert_array_equal(np.asarray(quantized_matmul(x, qw, impl=IMPL)), np.asarray(q[:3]))


def test_int4_extremes_and_per_group_scales_with_int8_activations():
    """Both nibbles hit -8 and 7 against xq = +-127, two groups with scales 1 and 2, x_scale 0.5."""
    q = np.array([[-8, 7, 0, -1], [7, -8, 1, 0]] * 64)  # [128, 4]
    qw = QuantizedWeight(pack_int4(jnp.asarray(q)), jnp.array([[1.0] * 4, [2.0] * 4], jnp.float32), 4, 64)
    xq = np.zeros((3, 128), np.int8)
    xq[0, 0], xq[1, 1], xq[2, [64, 127]] = 127, -127, (127, -127)
    want = 0.5 * np.array([127 * q[0], -127 * q[1], 2 * 127 * (q[64] - q[127])], np.float32)
    for impl in ("xla", IMPL):
        np.testing.assert_array_equal(np.asarray(quantized_matmul_int8(jnp.asarray(xq), 0.5, qw, impl=impl)), want)


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_accumulation_is_exact_beyond_float32(bits):
    """One group of K same-sign products: sums exceed 2^24, where float32 accumulation would round, but
    with unit scales each output is the float32 rounding of the exact integer sum, in reference and kernel."""
    rng = np.random.default_rng(bits)
    k, n = (4096 if bits == 8 else 32768), 8  # |xq * q| <= 127 * 127 or 127 * 8
    xq = jnp.asarray(rng.integers(100, 128, (3, k)), jnp.int8)
    codes = rng.integers(90, 128, (k, n)) if bits == 8 else rng.integers(-8, -5, (k, n))
    qw = random_quantized_weight(rng, k, n, bits, k, codes=codes)
    qw = QuantizedWeight(qw.values, jnp.ones_like(qw.scales), bits, k)
    exact = np.asarray(xq, np.int64) @ codes
    assert np.abs(exact).min() > 2**24
    for got in (int8_reference(xq, 1.0, qw, jnp.float32), int8_kernel(xq, 1.0, qw)):
        np.testing.assert_array_equal(np.asarray(got), exact.astype(np.float32))


def test_dispatchers_run_under_jit_with_static_metadata_and_traced_scale():
    x, w = _inputs(0, (2, 3), 64, 40, jnp.bfloat16)
    qw = quantize(w, 4, 32)
    assert len(jax.tree_util.tree_leaves(qw)) == 2  # bits and group_size are metadata, not leaves
    got = jax.jit(lambda x, qw: quantized_matmul(x, qw, impl=IMPL))(x, qw)
    assert got.shape == (2, 3, 40)
    assert_close(got, reference(x, qw), jnp.bfloat16)
    xq, x_scale, qw = random_int8_inputs(0, (2, 3), 128, 40, 4, 64)
    for impl in ("xla", IMPL, "auto"):
        got = jax.jit(lambda xq, s, qw, impl=impl: quantized_matmul_int8(xq, s, qw, out_dtype=jnp.bfloat16, impl=impl))(
            xq, jnp.float32(x_scale), qw
        )
        assert got.shape == (2, 3, 40) and got.dtype == jnp.bfloat16
        assert_close(got, int8_reference(xq, x_scale, qw, jnp.bfloat16), jnp.bfloat16)


def test_auto_on_gpu_falls_back_to_the_reference_for_small_groups():
    xq, x_scale, qw = random_int8_inputs(2, (4,), 64, 8, 4, 32)  # 16 packed rows per group: too few for int8 dots
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, "default_backend", lambda: "gpu")  # compiling Triton here would fail
        got = quantized_matmul_int8(xq, x_scale, qw)
        with pytest.raises(ValueError, match="block_sizes must be a QuantizedMatmulBlockSizes"):
            quantized_matmul_int8(xq, x_scale, qw, block_sizes=QuantizedMatmulTPUBlockSizes())
    assert_close(got, int8_reference(xq, x_scale, qw, jnp.float32), jnp.float32)


def test_clear_errors():
    qw = quantize(jnp.ones((64, 8)), 8, 32)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 64\] \(the weight's K\), got \(2, 32\)"):
        quantized_matmul(jnp.ones((2, 32)), qw)
    if jax.default_backend() == "cpu":  # on a GPU, impl="pallas" compiles
        with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
            quantized_matmul(jnp.ones((2, 64)), qw, impl="pallas")
    small_groups = quantize(jnp.ones((64, 8)), 4, 16)  # 8 packed rows per group: below Triton's dot minimum
    with pytest.raises(ValueError, match="group_size to be a multiple of 32 for 4 bits, got 16"):
        quantized_matmul(jnp.ones((2, 64)), small_groups, impl=IMPL)
    np.testing.assert_allclose(np.asarray(quantized_matmul(jnp.ones((2, 64)), small_groups)), 64.0, rtol=1e-6)
    with pytest.raises(ValueError, match="QuantizedMatmulBlockSizes: block_k must be a power of two >= 16, got 100"):
        QuantizedMatmulBlockSizes(block_k=100)


def test_int8_clear_errors():
    rng = np.random.default_rng(0)
    qw = random_quantized_weight(rng, 64, 8, 8, 32)
    xq = jnp.ones((2, 64), jnp.int8)
    name = "quantized_matmul_int8"
    cases = [
        ((jnp.ones((2, 64)), 0.1, qw), "xq must be int8 activation codes, got float32"),
        ((xq.astype(jnp.int32), 0.1, qw), "xq must be int8 activation codes, got int32"),
        ((jnp.ones((2, 32), jnp.int8), 0.1, qw), r"xq must have shape \[..., 64\] \(the weight's K\), got \(2, 32\)"),
        ((xq, jnp.ones((2,)), qw), r"x_scale must be a floating-point scalar .* got float32 with shape \(2,\)"),
        ((xq, 1, qw), r"x_scale must be a floating-point scalar .* got int32 with shape \(\)"),
        ((xq, 0.1, QuantizedWeight(qw.values, qw.scales, 9, 32)), "bits must be an int in 2..8, got 9"),
        ((xq, 0.1, QuantizedWeight(qw.values, qw.scales, 8, 48)), r"K \(64\) must be a multiple of group_size \(48\)"),
        ((xq, 0.1, QuantizedWeight(qw.values, qw.scales[:1], 8, 32)), r"scales must have shape \(2, 8\), got \(1, 8\)"),
        ((xq, 0.1, QuantizedWeight(qw.values.astype(jnp.uint8), qw.scales, 8, 32)), "8-bit values must be int8"),
    ]
    for args, message in cases:
        for impl in ("xla", IMPL):
            with pytest.raises(ValueError, match=f"{name}: {message}"):
                quantized_matmul_int8(*args, impl=impl)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point dtype, got int32"):
        quantized_matmul_int8(xq, 0.1, qw, out_dtype=jnp.int32)
    if jax.default_backend() == "cpu":  # on a GPU, impl="pallas" compiles
        with pytest.raises(ValueError, match=f"{name}: no compiled Pallas kernel for backend 'cpu'"):
            quantized_matmul_int8(xq, 0.1, qw, impl="pallas")
    with pytest.raises(ValueError, match=f"{name}: unknown impl 'triton'"):
        quantized_matmul_int8(xq, 0.1, qw, impl="triton")
    small_groups = random_quantized_weight(rng, 64, 8, 4, 32)
    with pytest.raises(ValueError, match="needs group_size to be a multiple of 64 for 4 bits, got 32; use impl='xla'"):
        quantized_matmul_int8(xq, 0.1, small_groups, impl=IMPL)
    with pytest.raises(ValueError, match="needs group_size to be a multiple of 32 for 8 bits, got 48"):
        quantized_matmul_int8(jnp.ones((2, 96), jnp.int8), 0.1, random_quantized_weight(rng, 96, 8, 8, 48), impl=IMPL)


@pytest.mark.parametrize("k, n", [(576, 1536), (4096, 11008)])  # SmolLM2's MLP up, Llama-7B's MLP up
@pytest.mark.parametrize("bits", [4, 8])
def test_kernels_lower_to_triton_for_decode_shapes(k, n, bits):
    """Weight-only: m 1 and 16 rows, groups of 64 and 32. Integer-activation: decode (m 1) and
    verification-sized (m 16) rows, groups of 64 and per-channel (one group of all K rows: 9 chunks of 64
    rows for K 576, 16 of 256 for K 4096)."""
    rows = k if bits == 8 else k // 2
    values = S((rows, n), jnp.int8 if bits == 8 else jnp.uint8)
    for m, x_dtype, group, scale_dtype in ((1, jnp.bfloat16, 64, jnp.bfloat16), (16, jnp.float32, 32, jnp.float32)):
        qw = QuantizedWeight(values, S((k // group, n), scale_dtype), bits, group)
        assert_lowers_to_triton(quantized_matmul_pallas, S((m, k), x_dtype), qw)
    for m, group, out_dtype in ((1, 64, jnp.float32), (16, k, jnp.bfloat16)):
        qw = QuantizedWeight(values, S((k // group, n), jnp.float32), bits, group)
        assert_lowers_to_triton(
            functools.partial(quantized_matmul_int8_pallas, out_dtype=out_dtype),
            S((m, k), jnp.int8),
            S((), jnp.float32),
            qw,
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_offsets_asymmetric_weights_through_reference_kernel_and_int8(bits):
    """w = q * scale + offset (GGUF's Q4_1 / Q4_K): the reference is x @ the dequantized weight (checked
    against numpy), and the dispatchers' kernel path (symmetric part + the offsets' share) equals it."""
    rng = np.random.default_rng(bits)
    k, n, group = 256, 48, 64
    x, w = _inputs(bits, (3,), k, n, jnp.float32)
    sym = quantize_weights(w, bits, group)
    offsets = jnp.asarray(rng.standard_normal((k // group, n)), jnp.float32)
    qw = QuantizedWeight(sym.values, sym.scales, bits, group, offsets)
    dense = np.asarray(dequantize_weights(sym)) + np.repeat(np.asarray(offsets), group, axis=0)
    np.testing.assert_allclose(np.asarray(dequantize_weights(qw)), dense, rtol=1e-6, atol=1e-6)
    want = np.asarray(x, np.float64) @ dense
    assert_close(reference(x, qw), want, jnp.float32)
    assert_close(kernel(x, qw), want, jnp.float32)
    xq = jnp.asarray(rng.integers(-127, 128, (3, k)), jnp.int8)
    want_int8 = 0.5 * (np.asarray(xq, np.float64) @ dense)
    np.testing.assert_allclose(np.asarray(int8_reference(xq, 0.5, qw, jnp.float32)), want_int8, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(int8_kernel(xq, 0.5, qw, out_dtype=jnp.float32)), want_int8, rtol=1e-5, atol=1e-3
    )
    with pytest.raises(ValueError, match="symmetric weights"):
        quantized_matmul_pallas(x, qw, interpret=INTERPRET)
    with pytest.raises(ValueError, match="offsets must be None or of shape"):
        quantized_matmul_ref(x, QuantizedWeight(sym.values, sym.scales, bits, group, offsets[:1]))
