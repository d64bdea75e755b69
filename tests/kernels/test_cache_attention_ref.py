"""Attention over a KV cache: the reference against a naive float64 loop on hypothesis-drawn ragged lengths."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import naive_attention

from pallas_kernels.cache_attention import cache_attention_ref


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    dim=st.sampled_from([4, 8, 16]),
    window=st.sampled_from([0, 1, 3, 7]),
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 5),
    cache=st.integers(6, 30),
    data=st.data(),
)
def test_cache_attention_ref_matches_naive_on_ragged_lengths(
    batch, kv_heads, group, dim, window, seed, steps, cache, data
):
    rng = np.random.default_rng(seed)
    before = [data.draw(st.integers(0, cache - steps)) for _ in range(batch)]
    positions = np.array([[n + t for t in range(steps)] for n in before])
    lengths = np.array(before) + steps
    q = rng.standard_normal((batch, steps, kv_heads * group, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, cache, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, cache, dim)).astype(np.float32)
    out = cache_attention_ref(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions), jnp.asarray(lengths), window
    )
    expected = naive_attention(q, k, v, positions, lengths, window)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)
