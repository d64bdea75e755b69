"""Attention references against a naive float64 loop, on hypothesis-drawn shapes; dispatcher errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import cache_attention, cache_attention_ref, flash_attention, flash_attention_ref
from pallas_kernels.dispatch import resolve_impl


def naive(q, k, v, q_positions, kv_lengths, window):
    """q: [B, T, H, D]; k, v: [B, H_kv, S, D]; loops over everything in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, steps, heads, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    for b in range(batch):
        for t in range(steps):
            p = q_positions[b][t]
            keys = [s for s in range(k.shape[2])
                    if s <= p and s < kv_lengths[b] and (window == 0 or s > p - window)]
            for h in range(heads):
                kh, vh = k[b, h // group], v[b, h // group]
                scores = np.array([q[b, t, h] @ kh[s] for s in keys]) / np.sqrt(dim)
                w = np.exp(scores - scores.max())
                out[b, t, h] = (w / w.sum()) @ vh[keys]
    return out


shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "kv_heads": st.integers(1, 3), "group": st.integers(1, 3),
    "dim": st.sampled_from([4, 8, 16]), "window": st.sampled_from([0, 1, 3, 7]), "seed": st.integers(0, 2**31),
})


@settings(max_examples=8, deadline=None)
@given(shapes=shapes, steps=st.integers(1, 40), block=st.sampled_from([4, 7, 16, 128]))
def test_flash_attention_ref_matches_naive(shapes, steps, block):
    rng = np.random.default_rng(shapes["seed"])
    b, hk, g, d = shapes["batch"], shapes["kv_heads"], shapes["group"], shapes["dim"]
    q = rng.standard_normal((b, steps, hk * g, d)).astype(np.float32)
    k = rng.standard_normal((b, steps, hk, d)).astype(np.float32)
    v = rng.standard_normal((b, steps, hk, d)).astype(np.float32)
    out = flash_attention_ref(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), shapes["window"], block=block)
    positions = np.tile(np.arange(steps), (b, 1))
    expected = naive(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, [steps] * b, shapes["window"])
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(shapes=shapes, steps=st.integers(1, 5), cache=st.integers(6, 30), data=st.data())
def test_cache_attention_ref_matches_naive_on_ragged_lengths(shapes, steps, cache, data):
    rng = np.random.default_rng(shapes["seed"])
    b, hk, g, d = shapes["batch"], shapes["kv_heads"], shapes["group"], shapes["dim"]
    before = [data.draw(st.integers(0, cache - steps)) for _ in range(b)]
    positions = np.array([[n + t for t in range(steps)] for n in before])
    lengths = np.array(before) + steps
    q = rng.standard_normal((b, steps, hk * g, d)).astype(np.float32)
    k = rng.standard_normal((b, hk, cache, d)).astype(np.float32)
    v = rng.standard_normal((b, hk, cache, d)).astype(np.float32)
    out = cache_attention_ref(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions),
                              jnp.asarray(lengths), shapes["window"])
    expected = naive(q, k, v, positions, lengths, shapes["window"])
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_bf16_inputs_keep_f32_softmax():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 9, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 9, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 9, 2, 16)).astype(np.float32)
    out = flash_attention_ref(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    expected = naive(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), np.tile(np.arange(9), (2, 1)), [9, 9], 0)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05)


def test_dispatchers_run_the_reference_and_reject_unavailable_impls():
    q = jnp.ones((1, 2, 2, 4))
    k = jnp.ones((1, 2, 1, 4))
    np.testing.assert_array_equal(flash_attention(q, k, k, impl="xla"), flash_attention_ref(q, k, k))
    with pytest.raises(ValueError, match="flash_attention: unknown impl 'cuda'"):
        flash_attention(q, k, k, impl="cuda")
    with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
        cache_attention(q, k.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), jnp.zeros((1, 2), int),
                        jnp.array([2]), impl="pallas")
    with pytest.raises(ValueError, match="has no Pallas kernel yet"):
        resolve_impl("interpret", "some_kernel")
    assert resolve_impl("auto", "x", ("gpu",)) == "xla"  # on CPU, auto is the reference
