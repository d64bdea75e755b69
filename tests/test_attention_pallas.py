"""Pallas attention kernels (prefill flash, split-K decode over a cache with optional int8 K/V, draft
tree) in interpret mode against their jnp references, on hypothesis-drawn shapes, ragged lengths and
dtypes; their Triton lowering for GPU; dispatch fallbacks and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_triton

from pallas_kernels.cache_attention import cache_attention, cache_attention_pallas, cache_attention_ref
from pallas_kernels.flash_attention import flash_attention, flash_attention_pallas, flash_attention_ref
from pallas_kernels.tree_attention import tree_attention, tree_attention_pallas, tree_attention_ref

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
heads = st.tuples(st.integers(1, 2), st.integers(1, 3))  # (kv heads, group)


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape).astype(dtype)


@settings(max_examples=3, deadline=None)
@given(batch=st.integers(1, 2), steps=st.integers(1, 70), heads=heads, dim=st.sampled_from([16, 32]),
       window=st.sampled_from([0, 1, 5, 70]), dtype=DTYPES, data=st.data())
def test_flash_attention_kernel_matches_reference(batch, steps, heads, dim, window, dtype, data):
    kv_heads, group = heads
    lengths = jnp.array([data.draw(st.integers(0, steps)) for _ in range(batch)])
    k = jax.random.split(jax.random.PRNGKey(data.draw(st.integers(0, 2**16))), 3)
    q = _normal(k[0], (batch, steps, kv_heads * group, dim), dtype)
    kk, v = (_normal(key, (batch, steps, kv_heads, dim), dtype) for key in k[1:])
    got = flash_attention(q, kk, v, window, lengths=lengths, impl="interpret")
    assert got.dtype == dtype
    assert_close(got, flash_attention_ref(q, kk, v, window, lengths=lengths), dtype)


@settings(max_examples=3, deadline=None)
@given(batch=st.integers(1, 2), steps=st.integers(1, 4), cache=st.integers(4, 90), heads=heads,
       dim=st.sampled_from([16, 32]), window=st.sampled_from([0, 3, 50]), dtype=DTYPES, int8=st.booleans(),
       data=st.data())
def test_split_k_cache_attention_matches_reference(batch, steps, cache, heads, dim, window, dtype, int8, data):
    kv_heads, group = heads
    steps = min(steps, cache)
    lengths = jnp.array([data.draw(st.integers(steps, cache)) for _ in range(batch)])
    positions = lengths[:, None] - steps + jnp.arange(steps)
    k = jax.random.split(jax.random.PRNGKey(data.draw(st.integers(0, 2**16))), 5)
    q = _normal(k[0], (batch, steps, kv_heads * group, dim), dtype)
    shape = (batch, kv_heads, cache, dim)
    if int8:
        kk, v = (jax.random.randint(key, shape, -127, 128).astype(jnp.int8) for key in k[1:3])
        ks, vs = (0.01 * jnp.abs(jax.random.normal(key, shape[:3])) for key in k[3:])
    else:
        kk, v = (_normal(key, shape, dtype) for key in k[1:3])
        ks = vs = None
    got = cache_attention(q, kk, v, positions, lengths, window, None, ks, vs, impl="interpret")
    assert got.dtype == dtype
    assert_close(got, cache_attention_ref(q, kk, v, positions, lengths, window, None, ks, vs), dtype)


def test_split_k_uses_several_splits_and_merges_them(monkeypatch):
    from pallas_kernels import gpu_params

    monkeypatch.setitem(gpu_params.SPLIT_K_ATTENTION, "block_k", 16)  # 200 keys -> 13 splits of 16
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(k[0], (1, 1, 4, 16))
    kk, v = (jax.random.normal(key, (1, 2, 200, 16)) for key in k[1:])
    lengths = jnp.array([187])
    got = cache_attention_pallas(q, kk, v, lengths[:, None] - 1, lengths, interpret=True)
    assert_close(got, cache_attention_ref(q, kk, v, lengths[:, None] - 1, lengths), jnp.float32)


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 2), steps=st.integers(1, 9), prefix=st.integers(0, 70), heads=heads,
       dtype=DTYPES, data=st.data())
def test_tree_attention_kernel_matches_reference(batch, steps, prefix, heads, dtype, data):
    kv_heads, group = heads
    cache = prefix + steps + data.draw(st.integers(0, 20))
    prefixes = jnp.array([data.draw(st.integers(0, prefix)) for _ in range(batch)])
    k = jax.random.split(jax.random.PRNGKey(data.draw(st.integers(0, 2**16))), 4)
    q = _normal(k[0], (batch, steps, kv_heads * group, 16), dtype)
    kk, v = (_normal(key, (batch, kv_heads, cache, 16), dtype) for key in k[1:3])
    mask = jax.random.bernoulli(k[3], 0.4, (batch, steps, steps)) | jnp.eye(steps, dtype=bool)
    got = tree_attention(q, kk, v, prefixes, mask, impl="interpret")
    assert_close(got, tree_attention_ref(q, kk, v, prefixes, mask), dtype)


def test_tree_attention_of_a_chain_is_causal_cache_attention():
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(k[0], (2, 5, 6, 16))
    kk, v = (jax.random.normal(key, (2, 2, 40, 16)) for key in k[1:])
    prefix = jnp.array([30, 0])
    chain = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (2, 5, 5))
    want = cache_attention_ref(q, kk, v, prefix[:, None] + jnp.arange(5), prefix + 5)
    assert_close(tree_attention_ref(q, kk, v, prefix, chain), want, jnp.float32)
    assert_close(tree_attention(q, kk, v, prefix, chain, impl="interpret"), want, jnp.float32)


def test_attention_kernels_lower_to_triton_for_gpu():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    # SmolLM2-135M shapes (9 heads, 3 kv heads, head_dim 64): 1000-token prefill, decode at 2000.
    assert_lowers_to_triton(lambda q, k, v, n: flash_attention_pallas(q, k, v, 0, None, n),
                            bf16(2, 1000, 9, 64), bf16(2, 1000, 3, 64), bf16(2, 1000, 3, 64), i32(2))
    assert_lowers_to_triton(lambda *a: cache_attention_pallas(*a), bf16(4, 1, 9, 64), bf16(4, 3, 2000, 64),
                            bf16(4, 3, 2000, 64), i32(4, 1), i32(4))
    int8 = jax.ShapeDtypeStruct((4, 8, 4096, 128), jnp.int8)  # Llama-3-8B-like, int8 cache
    scales = jax.ShapeDtypeStruct((4, 8, 4096), jnp.float32)
    assert_lowers_to_triton(lambda q, k, v, p, n, ks, vs: cache_attention_pallas(q, k, v, p, n, 0, None, ks, vs),
                            bf16(4, 1, 32, 128), int8, int8, i32(4, 1), i32(4), scales, scales)
    assert_lowers_to_triton(tree_attention_pallas, bf16(1, 16, 9, 64), bf16(1, 3, 2000, 64), bf16(1, 3, 2000, 64), i32(1),
                            jax.ShapeDtypeStruct((1, 16, 16), jnp.bool_))


def test_attention_dispatch_fallbacks_and_errors():
    q = jnp.ones((1, 2, 2, 8))  # head_dim 8: too small for Triton's dot
    k = jnp.ones((1, 2, 1, 8))
    np.testing.assert_array_equal(flash_attention(q, k, k, impl="auto"), flash_attention_ref(q, k, k))
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16, got 8"):
        flash_attention(q, k, k, impl="interpret")
    with pytest.raises(ValueError, match=r"lengths must be \[1\]"):
        flash_attention(jnp.ones((1, 2, 2, 16)), jnp.ones((1, 2, 1, 16)), jnp.ones((1, 2, 1, 16)),
                        lengths=jnp.array([1, 2]), impl="interpret")
    cache = jnp.ones((1, 1, 4, 16))
    with pytest.raises(ValueError, match="int8 k/v need k_scale and v_scale"):
        cache_attention(jnp.ones((1, 1, 2, 16)), cache.astype(jnp.int8), cache.astype(jnp.int8),
                        jnp.zeros((1, 1), int), jnp.array([1]), impl="interpret")
    with pytest.raises(ValueError, match=r"tree_mask must be \[B, T_q, T_q\]"):
        tree_attention(jnp.ones((1, 2, 2, 16)), cache, cache, jnp.array([1]), jnp.ones((1, 2, 3), bool))


def test_attention_kernels_run_under_jit():
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(k[0], (1, 20, 4, 16))
    kk, v = (jax.random.normal(key, (1, 20, 2, 16)) for key in k[1:])
    run = jax.jit(lambda q, w: flash_attention(q, kk, v, w, impl="interpret"))
    assert_close(run(q, 4), flash_attention_ref(q, kk, v, 4), jnp.float32)
