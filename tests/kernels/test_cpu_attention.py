"""The CPU attention kernel (`pallas_kernels.cpu_attention`): against the naive float64 loop and the jnp reference on
hypothesis-drawn shapes and masks, and its two exactness properties: a query row gets the same bits whatever the
other rows of the call, and whatever slots its visible keys sit in; so a draft-tree node equals the same token
attended alone after its path. Also the stacked-cache `layer` operand, the "auto" dispatch and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import naive_attention

from pallas_kernels import cpu_attention
from pallas_kernels import cpu_build as build
from pallas_kernels.cache_attention import cache_attention, masked, masked_attention
from pallas_kernels.tree_attention import tree_attention
from ssm_llm.norm import halving_sum

pytestmark = pytest.mark.skipif(build._check_host() is not None, reason="an x86-64 AVX2 host with a C++ compiler")


def operands(rng, batch, steps, heads, kv_heads, seq, dim, layers=None):
    lead = () if layers is None else (layers,)
    q = rng.standard_normal((batch, steps, heads, dim)).astype(np.float32)
    k = rng.standard_normal((*lead, batch, kv_heads, seq, dim)).astype(np.float32)
    v = rng.standard_normal((*lead, batch, kv_heads, seq, dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    dim=st.sampled_from([8, 16, 24, 64, 136]),
    window=st.sampled_from([0, 1, 3, 7]),
    steps=st.integers(1, 5),
    cache=st.integers(6, 40),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_cache_attention_through_the_kernel_matches_the_naive_loop(
    batch, kv_heads, group, dim, window, steps, cache, seed, data
):
    rng = np.random.default_rng(seed)
    before = [data.draw(st.integers(0, cache - steps)) for _ in range(batch)]
    positions = np.array([[n + t for t in range(steps)] for n in before])
    lengths = np.array(before) + steps
    q, k, v = operands(rng, batch, steps, kv_heads * group, kv_heads, cache, dim)
    assert cpu_attention.applies(q, k)
    out = cache_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), window)
    expected = naive_attention(np.asarray(q), np.asarray(k), np.asarray(v), positions, lengths, window)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    steps=st.integers(1, 6),
    seq=st.integers(1, 50),
    heads=st.sampled_from([(1, 1), (4, 2), (9, 3)]),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_any_mask_matches_the_reference_and_a_row_seeing_nothing_is_zero(steps, seq, heads, density, seed):
    rng = np.random.default_rng(seed)
    q, k, v = operands(rng, 2, steps, heads[0], heads[1], seq, 16)
    visible = jnp.asarray(rng.random((2, steps, seq)) < density)
    out = cpu_attention.masked_attention(q, k, v, visible)
    np.testing.assert_allclose(np.asarray(out), np.asarray(masked_attention(q, k, v, visible)), atol=2e-5, rtol=1e-4)
    blind = ~np.asarray(visible).any(-1)
    assert (np.asarray(out)[blind] == 0).all()


def test_a_row_gets_the_same_bits_alone_as_among_other_rows():
    rng = np.random.default_rng(0)
    q, k, v = operands(rng, 1, 21, 9, 3, 300, 64)
    visible = jnp.broadcast_to(jnp.arange(300) < 250, (1, 21, 300))
    together = cpu_attention.masked_attention(q, k, v, visible)
    for t in (0, 7, 20):
        alone = cpu_attention.masked_attention(q[:, t : t + 1], k, v, visible[:, t : t + 1])
        assert np.array_equal(np.asarray(alone[:, 0]), np.asarray(together[:, t]))


def test_only_the_order_of_the_visible_keys_counts_not_their_slots():
    rng = np.random.default_rng(1)
    q, k, v = operands(rng, 1, 1, 4, 2, 64, 32)
    keys = np.arange(64) < 40  # keys 0..39
    moved = np.concatenate([np.arange(30), [45, 50, 51, 60, 63] + list(range(30, 35))])  # same order, other slots
    k2, v2 = np.zeros_like(k), np.zeros_like(v)
    k2[:, :, np.sort(moved)] = np.asarray(k)[:, :, :40]
    v2[:, :, np.sort(moved)] = np.asarray(v)[:, :, :40]
    visible2 = np.zeros(64, bool)
    visible2[moved] = True
    a = cpu_attention.masked_attention(q, k, v, jnp.asarray(keys)[None, None])
    b = cpu_attention.masked_attention(q, jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(visible2)[None, None])
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_tree_node_equals_its_token_attended_alone_after_its_path():
    """Node 4 of the tree 0 -> {1, 2}, 1 -> 3, 3 -> 4 sits at slot prefix + 4 with its ancestors at prefix + {0, 1,
    3}; decoded alone after its path, the same keys sit at prefix + 0..3 and it attends to them at prefix + 3."""
    rng = np.random.default_rng(2)
    prefix, layers, layer = 20, 3, 1
    q, k, v = operands(rng, 1, 5, 6, 3, 32, 16, layers=layers)
    parents = [-1, 0, 0, 1, 3]
    mask = np.eye(5, dtype=bool)
    for i, p in enumerate(parents):
        while p >= 0:
            mask[i, p], p = True, parents[p]
    tree = tree_attention(q, k, v, jnp.asarray([prefix]), jnp.asarray(mask)[None], layer=jnp.int32(layer))
    path = [0, 1, 3, 4]
    k_seq = k.at[:, :, :, prefix : prefix + 4].set(k[:, :, :, [prefix + i for i in path]])
    v_seq = v.at[:, :, :, prefix : prefix + 4].set(v[:, :, :, [prefix + i for i in path]])
    alone = cache_attention(
        q[:, 4:5], k_seq, v_seq, jnp.asarray([[prefix + 3]]), jnp.asarray([prefix + 4]), layer=jnp.int32(layer)
    )
    assert np.array_equal(np.asarray(alone[:, 0]), np.asarray(tree[:, 4]))
    reference = tree_attention(q, k, v, jnp.asarray([prefix]), jnp.asarray(mask)[None], layer=layer, impl="xla")
    np.testing.assert_allclose(np.asarray(tree), np.asarray(reference), atol=2e-5, rtol=1e-4)


def test_the_layer_operand_reads_one_layer_of_the_stacked_cache_in_place_under_jit():
    rng = np.random.default_rng(3)
    q, k, v = operands(rng, 2, 3, 4, 2, 24, 8, layers=4)
    visible = jnp.asarray(rng.random((2, 3, 24)) < 0.7)
    run = jax.jit(lambda q, k, v, vis, layer: masked(q, k, v, vis, layer=layer))
    for layer in range(4):
        expected = cpu_attention.masked_attention(q, k[layer], v[layer], visible)
        assert np.array_equal(np.asarray(run(q, k, v, visible, jnp.int32(layer))), np.asarray(expected))
    with pytest.raises(ValueError, match=r"with a layer index k and v are \[L, B, H_kv, S, D\]"):
        cpu_attention.masked_attention(q, k[0], v[0], visible, layer=0)


def test_auto_takes_the_kernel_only_where_it_applies():
    rng = np.random.default_rng(4)
    q, k, _ = operands(rng, 1, 2, 4, 2, 8, 16)
    assert cpu_attention.applies(q, k)
    assert not cpu_attention.applies(q, k, k_scale=jnp.ones((1, 2, 8)))  # int8 cache: the reference
    assert not cpu_attention.applies(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert not cpu_attention.applies(q[..., :12], k[..., :12])  # head_dim not a multiple of 8
    long_q = jnp.zeros((1, cpu_attention.MAX_ROWS + 1, 4, 16))
    assert not cpu_attention.applies(long_q, k)  # a long chunk keeps XLA's batched dot


def test_bad_operands_raise_naming_them():
    q, k, v = operands(np.random.default_rng(5), 1, 2, 4, 2, 8, 16)
    visible = jnp.ones((1, 2, 8), bool)
    with pytest.raises(ValueError, match="visible"):
        cpu_attention.masked_attention(q, k, v, visible[:, :1])
    with pytest.raises(ValueError, match="H a multiple of H_kv"):
        cpu_attention.masked_attention(q[:, :, :3], k, v, visible)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.masked_attention(q.astype(jnp.bfloat16), k, v, visible)


def test_halving_sum_gives_every_row_the_same_bits_whatever_the_row_count():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((9, 576)) * 3, jnp.float32)
    total = jax.jit(halving_sum)
    alone = np.asarray(total(x[:1]))[0]
    for rows in (2, 4, 8, 9):
        assert np.asarray(total(x[:rows]))[0] == alone
    np.testing.assert_allclose(np.asarray(total(x)), np.asarray(x, np.float64).sum(-1), rtol=1e-5, atol=1e-4)
    assert float(halving_sum(jnp.ones((1,)))[()]) == 1.0


def test_a_nan_query_gives_a_nan_row_as_the_reference_does():
    q, k, v = operands(np.random.default_rng(7), 1, 2, 4, 2, 8, 16)
    q = q.at[0, 1, 0, 3].set(jnp.nan)
    out = np.asarray(cpu_attention.masked_attention(q, k, v, jnp.ones((1, 2, 8), bool)))
    assert np.isnan(out[0, 1, 0]).all() and np.isfinite(out[0, 0]).all()
