"""The TPU (Mosaic) variant of draft-tree attention: TPU interpret mode against the reference on
hypothesis-drawn ragged shapes and random ancestor masks (float and int8 caches), the Mosaic lowering
on realistic shapes, and the dispatch on TPU.

The TPU interpreter fills uninitialized memory and the out-of-bounds part of a partial last K/V block
with NaN, so `assert_close` (which fails on non-finite values) also catches unwritten outputs and
unmasked garbage keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, dispatch_on_tpu, random_attention_inputs

from pallas_kernels.cache_attention import CacheAttentionTPUBlockSizes, cache_attention_ref
from pallas_kernels.tree_attention import tree_attention, tree_attention_pallas_tpu, tree_attention_ref

# Small blocks so tiny shapes still take several key blocks (a partial last one) and row blocks.
SMALL_BLOCKS = CacheAttentionTPUBlockSizes(block_k=128, max_rows=16)


def _inputs(seed, batch, steps, heads, kv_heads, seq, dim, dtype, quantized, prefixes):
    """q [B, T_q, H, D], cache k/v [B, H_kv, S, D] (+ scales), prefix_lengths [B] and a random tree mask
    [B, T_q, T_q] (each draft sees itself)."""
    rng = np.random.default_rng(seed)
    q, k, v, k_scale, v_scale = random_attention_inputs(rng, batch, steps, heads, kv_heads, seq, dim, dtype, quantized)
    mask = jnp.asarray((rng.random((batch, steps, steps)) < 0.4) | np.eye(steps, dtype=bool))
    return q, k, v, jnp.asarray(prefixes, jnp.int32), mask, k_scale, v_scale


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    steps=st.integers(1, 9),
    seq=st.sampled_from([9, 40, 200]),
    dim=st.sampled_from([8, 32]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    quantized=st.booleans(),
    data=st.data(),
)
def test_tpu_kernel_matches_reference(batch, kv_heads, group, steps, seq, dim, dtype, quantized, data):
    steps = min(steps, seq)
    prefixes = [data.draw(st.integers(0, seq)) for _ in range(batch)]  # drafts may run past S
    q, k, v, prefix, mask, k_scale, v_scale = _inputs(
        data.draw(st.integers(0, 2**16)), batch, steps, kv_heads * group, kv_heads, seq, dim, dtype, quantized, prefixes
    )
    got = tree_attention_pallas_tpu(
        q, k, v, prefix, mask, None, k_scale, v_scale, block_sizes=SMALL_BLOCKS, interpret=True
    )
    want = tree_attention_ref(q, k, v, prefix, mask, None, k_scale, v_scale)
    assert got.dtype == q.dtype
    assert_close(got, want, dtype)


def test_tpu_kernel_of_a_chain_across_key_blocks_is_causal_cache_attention():
    # drafts at 125..130 straddle the 128-key block boundary; 6 steps x group 3 = 18 rows: two row blocks
    q, k, v, _, _, _, _ = _inputs(1, 2, 6, 6, 2, 200, 16, jnp.float32, False, [0, 0])
    prefix = jnp.array([125, 0])
    chain = jnp.broadcast_to(jnp.tril(jnp.ones((6, 6), bool)), (2, 6, 6))
    run = jax.jit(lambda *a: tree_attention_pallas_tpu(*a, scale=0.3, block_sizes=SMALL_BLOCKS, interpret=True))
    got = run(q, k, v, prefix, chain)
    want = cache_attention_ref(q, k, v, prefix[:, None] + jnp.arange(6), prefix + 6, 0, 0.3)
    assert_close(got, want, jnp.float32)


def test_tpu_kernel_rejects_bad_inputs():
    q, k, v, prefix, mask, _, _ = _inputs(0, 1, 2, 2, 2, 8, 16, jnp.float32, False, [3])
    with pytest.raises(ValueError, match=r"tree_mask must be \[B, T_q, T_q\]"):
        tree_attention_pallas_tpu(q, k, v, prefix, mask[:, :, :1], interpret=True)
    with pytest.raises(ValueError, match=r"prefix_lengths must be \[1\]"):
        tree_attention_pallas_tpu(q, k, v, jnp.array([1, 2]), mask, interpret=True)
    with pytest.raises(ValueError, match="int8 k/v need k_scale and v_scale"):
        tree_attention_pallas_tpu(q, k.astype(jnp.int8), v.astype(jnp.int8), prefix, mask, interpret=True)


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
    "batch,steps,heads,kv_heads,seq,dim,dtype,quantized",
    [
        (8, 16, 32, 8, 4000, 128, jnp.bfloat16, False),  # 16 drafts x group 4, ragged S
        (2, 64, 32, 4, 4096, 128, jnp.bfloat16, True),  # 64 drafts x group 8 = 512 rows, int8 cache
        (1, 16, 9, 3, 2000, 64, jnp.float32, False),  # SmolLM2-135M heads, float32
    ],
)
def test_tpu_kernel_lowers_to_mosaic(batch, steps, heads, kv_heads, seq, dim, dtype, quantized):
    cache_dtype = jnp.int8 if quantized else dtype
    args = [
        S((batch, steps, heads, dim), dtype),
        S((batch, kv_heads, seq, dim), cache_dtype),
        S((batch, kv_heads, seq, dim), cache_dtype),
        S((batch,), jnp.int32),
        S((batch, steps, steps), jnp.bool_),
    ]
    if quantized:
        args += [S((batch, kv_heads, seq), jnp.float32)] * 2
        fn = lambda q, k, v, p, m, ks, vs: tree_attention_pallas_tpu(q, k, v, p, m, None, ks, vs)  # noqa: E731
    else:
        fn = tree_attention_pallas_tpu
    assert_lowers_to_mosaic_tpu(fn, *args)


def test_dispatcher_uses_tpu_variant_on_tpu():
    q, k, v, prefix, mask, _, _ = _inputs(0, 1, 2, 4, 2, 9, 16, jnp.float32, False, [7])
    got = dispatch_on_tpu(
        tree_attention, "tree_attention_pallas_tpu", q, k, v, prefix, mask, block_sizes=SMALL_BLOCKS, execute=False
    )
    assert got.shape == q.shape and got.dtype == q.dtype
    # impl="interpret" still interprets the GPU kernel
    assert_close(
        tree_attention(q, k, v, prefix, mask, impl="interpret"), tree_attention_ref(q, k, v, prefix, mask), jnp.float32
    )
