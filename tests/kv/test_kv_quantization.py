"""KV quantizers (ssm_llm.kv.quantization): quantize -> dequantize stays within the bound each bit
width implies (|x - x_hat| <= scale / 2 per group) on random tensors and on SmolLM2's real cache;
packing round trips; bytes shrink as the bit width says; bad options raise clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssm_llm
from ssm_llm.kv import BITS, cache_bytes, dequantize, pack_codes, quantize, quantize_keys, quantize_values, unpack_codes
from ssm_llm.kv.quantization import group_view


def _assert_within_bound(x, q):
    """Every element's error is at most half its group's step (plus float32 rounding of the range)."""
    err, _ = group_view(jnp.abs(jnp.asarray(x, jnp.float32) - dequantize(q)), q.group_size, q.axis)
    span = q.scale * ((1 << q.bits) - 1)
    bound = q.scale / 2 + 1e-6 * (span + jnp.abs(q.zero))
    assert bool(jnp.all(err <= bound)), float(jnp.max(err - bound))


@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    axis=st.sampled_from(["tokens", "channels"]),
    group=st.sampled_from([1, 4, 8, 32]),
    lead=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    outliers=st.booleans(),
)
def test_round_trip_error_within_the_bit_width_bound(bits, axis, group, lead, seed, outliers):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((lead, 64, 32)).astype(np.float32)
    if outliers:  # KIVI's key outlier channels
        x[..., 3] *= 30.0
    q = quantize(jnp.asarray(x), bits, group, axis)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (lead, 64, 32 * bits // 8)
    _assert_within_bound(x, q)


def test_more_bits_less_error_and_fewer_bytes():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 128, 64))
    errors, code_bytes = [], []
    for bits in BITS:
        q = quantize_keys(x, bits, 32)
        errors.append(float(jnp.sqrt(jnp.mean((dequantize(q) - x) ** 2))))
        code_bytes.append(cache_bytes(q.codes))
    assert errors[0] > errors[1] > errors[2]
    assert code_bytes == [x.size // 4, x.size // 2, x.size]


def test_pack_unpack_round_trip_every_code():
    for bits in BITS:
        codes = jnp.tile(jnp.arange(1 << bits, dtype=jnp.uint8), 8 // bits * 2)[None]
        packed = pack_codes(codes, bits)
        assert packed.shape[-1] == codes.shape[-1] * bits // 8
        np.testing.assert_array_equal(unpack_codes(packed, bits), codes)


def test_constant_groups_are_exact_and_quantize_jits():
    x = jnp.ones((2, 16, 8)) * 3.25
    for bits in BITS:
        np.testing.assert_array_equal(dequantize(jax.jit(quantize, static_argnums=(1, 2, 3))(x, bits, 8, "tokens")), x)


def test_real_smollm2_cache_within_bound(smollm2):
    config, params, tokenizer, _ = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8).input_ids[:64]
    _, cache = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 64))
    k, v = cache.k[:, 0], cache.v[:, 0]  # [L, H_kv, 64, D]
    for bits in BITS:
        qk, qv = quantize_keys(k, bits, 32), quantize_values(v, bits, 32)
        _assert_within_bound(k, qk)
        _assert_within_bound(v, qv)
        assert cache_bytes((qk, qv)) < cache_bytes((k, v)) * (bits / 32 + 0.1)


def test_bad_options_raise_clear_errors():
    x = jnp.zeros((2, 16, 8))
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quantize(x, 3, 8, "tokens")
    with pytest.raises(ValueError, match=r"the tokens axis \(16\) must be a multiple of group_size \(5\)"):
        quantize(x, 4, 5, "tokens")
    with pytest.raises(ValueError, match="group_size must be a positive int, got 0"):
        quantize(x, 4, 0, "channels")
    with pytest.raises(ValueError, match=r"2-bit codes pack 4 per byte along D, so D \(6\) must be a multiple of 4"):
        quantize(jnp.zeros((2, 16, 6)), 2, 2, "channels")
    with pytest.raises(ValueError, match="axis must be 'tokens' or 'channels'"):
        quantize(x, 4, 8, "heads")
