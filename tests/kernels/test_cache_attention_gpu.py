"""The Pallas (Triton) split-K attention over a KV cache (optional int8 K/V) in interpret mode against its
jnp reference, on hypothesis-drawn shapes, ragged lengths, windows and dtypes; several splits merged,
errors, and the Triton lowering for GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, INTERPRET, assert_close, assert_lowers_to_triton, random_attention_inputs

from pallas_kernels.cache_attention import (
    CacheAttentionBlockSizes,
    cache_attention,
    cache_attention_pallas,
    cache_attention_ref,
)


@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 4),
    cache=st.integers(4, 90),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    dim=st.sampled_from([16, 32]),
    window=st.sampled_from([0, 3, 50]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    int8=st.booleans(),
    data=st.data(),
)
def test_split_k_cache_attention_matches_reference(batch, steps, cache, heads, dim, window, dtype, int8, data):
    kv_heads, group = heads
    steps = min(steps, cache)
    lengths = jnp.array([data.draw(st.integers(steps, cache)) for _ in range(batch)])
    positions = lengths[:, None] - steps + jnp.arange(steps)
    q, k, v, ks, vs = random_attention_inputs(
        np.random.default_rng(data.draw(st.integers(0, 2**16))),
        batch,
        steps,
        kv_heads * group,
        kv_heads,
        cache,
        dim,
        dtype,
        int8,
    )
    got = cache_attention(q, k, v, positions, lengths, window, None, ks, vs, impl=IMPL)
    assert got.dtype == dtype
    assert_close(got, cache_attention_ref(q, k, v, positions, lengths, window, None, ks, vs), dtype)


def test_split_k_uses_several_splits_and_merges_them():
    q, k, v, _, _ = random_attention_inputs(np.random.default_rng(1), 1, 1, 4, 2, 200, 16, jnp.float32, False)
    lengths = jnp.array([187])
    blocks = CacheAttentionBlockSizes(block_k=16)  # 200 keys -> 13 splits of 16
    got = cache_attention_pallas(q, k, v, lengths[:, None] - 1, lengths, block_sizes=blocks, interpret=INTERPRET)
    assert_close(got, cache_attention_ref(q, k, v, lengths[:, None] - 1, lengths), jnp.float32)


def test_cache_attention_errors():
    cache = jnp.ones((1, 1, 4, 16))
    with pytest.raises(ValueError, match="int8 k/v need k_scale and v_scale"):
        cache_attention(
            jnp.ones((1, 1, 2, 16)),
            cache.astype(jnp.int8),
            cache.astype(jnp.int8),
            jnp.zeros((1, 1), int),
            jnp.array([1]),
            impl=IMPL,
        )
    with pytest.raises(ValueError, match="CacheAttentionBlockSizes: max_rows must be a power of two >= 16, got 8"):
        CacheAttentionBlockSizes(max_rows=8)


def test_cache_attention_lowers_to_triton_for_gpu():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    # SmolLM2-135M shapes (9 heads, 3 kv heads, head_dim 64): decode at 2000.
    assert_lowers_to_triton(
        lambda *a: cache_attention_pallas(*a),
        bf16(4, 1, 9, 64),
        bf16(4, 3, 2000, 64),
        bf16(4, 3, 2000, 64),
        i32(4, 1),
        i32(4),
    )
    int8 = jax.ShapeDtypeStruct((4, 8, 4096, 128), jnp.int8)  # Llama-3-8B-like, int8 cache
    scales = jax.ShapeDtypeStruct((4, 8, 4096), jnp.float32)
    assert_lowers_to_triton(
        lambda q, k, v, p, n, ks, vs: cache_attention_pallas(q, k, v, p, n, 0, None, ks, vs),
        bf16(4, 1, 32, 128),
        int8,
        int8,
        i32(4, 1),
        i32(4),
        scales,
        scales,
    )
