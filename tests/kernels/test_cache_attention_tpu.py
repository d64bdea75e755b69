"""The TPU (Mosaic) variant of attention over a KV cache: TPU interpret mode against the reference on
hypothesis-drawn ragged shapes (float and int8 caches), the Mosaic lowering on realistic shapes, and the
dispatch on TPU.

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

from pallas_kernels.cache_attention import (
    CacheAttentionTPUBlockSizes,
    cache_attention,
    cache_attention_pallas_tpu,
    cache_attention_ref,
)

# Small blocks so tiny shapes still take several key blocks (a partial last one) and row blocks.
SMALL_BLOCKS = CacheAttentionTPUBlockSizes(block_k=128, max_rows=16)


def _inputs(seed, batch, steps, heads, kv_heads, seq, dim, dtype, quantized, lengths):
    """q [B, T, H, D], cache k/v [B, H_kv, S, D] (+ scales), queries at the last `steps` positions."""
    q, k, v, k_scale, v_scale = random_attention_inputs(
        np.random.default_rng(seed), batch, steps, heads, kv_heads, seq, dim, dtype, quantized
    )
    kv_lengths = jnp.asarray(lengths, jnp.int32)
    q_positions = kv_lengths[:, None] - steps + jnp.arange(steps)[None]  # negative: sees no key
    return q, k, v, q_positions, kv_lengths, k_scale, v_scale


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    steps=st.integers(1, 3),
    seq=st.sampled_from([1, 40, 200]),
    dim=st.sampled_from([8, 32]),
    window=st.sampled_from([0, 1, 70]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    quantized=st.booleans(),
    data=st.data(),
)
def test_tpu_kernel_matches_reference(batch, kv_heads, group, steps, seq, dim, window, dtype, quantized, data):
    lengths = [data.draw(st.integers(0, seq)) for _ in range(batch)]
    args = _inputs(
        data.draw(st.integers(0, 2**16)), batch, steps, kv_heads * group, kv_heads, seq, dim, dtype, quantized, lengths
    )
    q, k, v, q_positions, kv_lengths, k_scale, v_scale = args
    got = cache_attention_pallas_tpu(
        q, k, v, q_positions, kv_lengths, window, None, k_scale, v_scale, block_sizes=SMALL_BLOCKS, interpret=True
    )
    want = cache_attention_ref(q, k, v, q_positions, kv_lengths, window, None, k_scale, v_scale)
    assert got.dtype == q.dtype
    assert_close(got, want, dtype)


def test_tpu_kernel_is_jittable_with_traced_window():
    # 3 steps x group 6 = 18 query rows: two row blocks of 16
    q, k, v, q_positions, kv_lengths, _, _ = _inputs(0, 1, 3, 12, 2, 200, 16, jnp.float32, False, [131])
    run = jax.jit(lambda *a: cache_attention_pallas_tpu(*a, scale=0.3, block_sizes=SMALL_BLOCKS, interpret=True))
    got = run(q, k, v, q_positions, kv_lengths, jnp.int32(100))
    assert_close(got, cache_attention_ref(q, k, v, q_positions, kv_lengths, 100, 0.3), jnp.float32)


def test_tpu_kernel_rejects_bad_inputs():
    q, k, v, q_positions, kv_lengths, _, _ = _inputs(0, 1, 1, 3, 2, 8, 16, jnp.float32, False, [8])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cache_attention_pallas_tpu(q, k, v, q_positions, kv_lengths, interpret=True)
    q, k, v, q_positions, kv_lengths, k_scale, _ = _inputs(0, 1, 1, 2, 2, 8, 16, jnp.float32, True, [8])
    with pytest.raises(ValueError, match="int8 k/v need k_scale and v_scale"):
        cache_attention_pallas_tpu(q, k, v, q_positions, kv_lengths, 0, None, k_scale, interpret=True)
    with pytest.raises(ValueError, match=r"must be \[B, H_kv, S, D\]"):
        cache_attention_pallas_tpu(q, k[..., :8], v, q_positions, kv_lengths, interpret=True)
    with pytest.raises(ValueError, match="CacheAttentionTPUBlockSizes: block_k must be a positive multiple of 128"):
        CacheAttentionTPUBlockSizes(block_k=64)


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
    "batch,steps,heads,kv_heads,seq,dim,dtype,quantized",
    [
        (8, 1, 32, 8, 4000, 128, jnp.bfloat16, False),  # decode, ragged S (partial last key block)
        (4, 128, 32, 4, 4096, 128, jnp.bfloat16, True),  # continued prefill, 1024 rows: two row blocks
        (2, 1, 8, 8, 1000, 64, jnp.float32, False),  # no GQA, head_dim 64
        (2, 1, 16, 2, 200, 128, jnp.float32, True),  # short cache: a single full-S block
    ],
)
def test_tpu_kernel_lowers_to_mosaic(batch, steps, heads, kv_heads, seq, dim, dtype, quantized):
    cache_dtype = jnp.int8 if quantized else dtype
    args = [
        S((batch, steps, heads, dim), dtype),
        S((batch, kv_heads, seq, dim), cache_dtype),
        S((batch, kv_heads, seq, dim), cache_dtype),
        S((batch, steps), jnp.int32),
        S((batch,), jnp.int32),
    ]
    if quantized:
        args += [S((batch, kv_heads, seq), jnp.float32)] * 2
        fn = lambda q, k, v, p, n, ks, vs: cache_attention_pallas_tpu(q, k, v, p, n, 256, None, ks, vs)  # noqa: E731
    else:
        fn = lambda q, k, v, p, n: cache_attention_pallas_tpu(q, k, v, p, n, 0)  # noqa: E731
    assert_lowers_to_mosaic_tpu(fn, *args)


def test_dispatcher_uses_tpu_variant_on_tpu():
    q, k, v, q_positions, kv_lengths, _, _ = _inputs(0, 1, 2, 4, 2, 9, 16, jnp.float32, False, [9])
    got = dispatch_on_tpu(
        cache_attention,
        "cache_attention_pallas_tpu",
        q,
        k,
        v,
        q_positions,
        kv_lengths,
        block_sizes=SMALL_BLOCKS,
        execute=False,
    )
    assert got.shape == q.shape and got.dtype == q.dtype
