"""The Pallas (Triton) paged attention that reads each sequence's pages in place through its block table, in
interpret mode (compiled on a GPU with SSM_LLM_KERNEL_IMPL=pallas) against the jnp reference on hypothesis
shapes (ragged lengths, windows, GQA, one or many splits); the dispatcher's choice; the Triton lowering for
GPU at SmolLM2's shapes, checked on this CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, INTERPRET, assert_lowers_to_triton
from test_ragged_paged_attention_ref import paged_case

from pallas_kernels.ragged_paged_attention import (
    PagedAttentionBlockSizes,
    ragged_paged_attention,
    ragged_paged_attention_pallas,
    ragged_paged_attention_ref,
)


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    dim=st.sampled_from([16, 32]),
    page=st.sampled_from([16, 32]),
    blocks=st.integers(1, 4),
    window=st.sampled_from([0, 5, 20]),
    steps=st.integers(1, 3),
    target=st.sampled_from([1, 264]),  # one split per sequence, or as many as its pages
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_in_place_kernel_matches_the_reference(
    batch, kv_heads, group, dim, page, blocks, window, steps, target, seed, data
):
    before = [data.draw(st.integers(0, blocks * page - steps)) for _ in range(batch)]
    rng = np.random.default_rng(seed)
    q, _, _, k_pages, v_pages, tables, positions, lengths = paged_case(
        rng, batch, kv_heads, group, dim, page, blocks, steps, before
    )
    args = tuple(map(jnp.asarray, (q, k_pages, v_pages, tables, positions, lengths)))
    expected = ragged_paged_attention_ref(*args, window)
    sizes = PagedAttentionBlockSizes(target_programs=target)
    out = ragged_paged_attention_pallas(*args, window, block_sizes=sizes, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5, rtol=1e-4)


def test_the_dispatcher_picks_the_in_place_kernel_for_float_pages():
    rng = np.random.default_rng(1)
    q, _, _, k_pages, v_pages, tables, positions, lengths = paged_case(rng, 2, 2, 2, 16, 16, 3, 2, [4, 30])
    args = tuple(map(jnp.asarray, (q, k_pages, v_pages, tables, positions, lengths)))
    expected = np.asarray(ragged_paged_attention_ref(*args, 7))
    np.testing.assert_allclose(np.asarray(ragged_paged_attention(*args, 7, impl=IMPL)), expected, atol=2e-5)
    small = paged_case(rng, 1, 1, 1, 16, 8, 2, 1, [0])  # 8-position pages: too small for Triton's dot
    small_args = tuple(map(jnp.asarray, (small[0], small[3], small[4], small[5], small[6], small[7])))
    with pytest.raises(ValueError, match="power-of-two head_dim and page_size >= 16"):
        ragged_paged_attention_pallas(*small_args, interpret=INTERPRET)
    np.testing.assert_allclose(  # the dispatcher gathers those instead
        np.asarray(ragged_paged_attention(*small_args, impl=IMPL)),
        np.asarray(ragged_paged_attention_ref(*small_args)),
        atol=2e-5,
    )


def test_paged_attention_lowers_to_triton_for_gpu():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    # SmolLM2-135M (9 heads, 3 kv heads, head_dim 64): 32 decode rows over 16-position pages, 64 pages each.
    assert_lowers_to_triton(
        lambda *a: ragged_paged_attention_pallas(*a),
        f32(32, 1, 9, 64),
        f32(2048, 3, 16, 64),
        f32(2048, 3, 16, 64),
        i32(32, 64),
        i32(32, 1),
        i32(32),
    )
