"""Attention over a paged KV cache: the reference against a naive float64 loop over each sequence's dense
cache, with the pages scattered over the pool by random block tables (hypothesis-drawn ragged lengths); the
dispatcher's gathered path in Pallas interpret mode; int8 pages; the page addressing of new tokens. The
in-place kernel: test_ragged_paged_attention_gpu.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import naive_attention

from pallas_kernels.ragged_paged_attention import (
    StreamingMask,
    page_slots,
    quantize_kv,
    ragged_paged_attention,
    ragged_paged_attention_ref,
)


def paged_case(rng, batch, kv_heads, group, dim, page, blocks, steps, before):
    """Dense caches [B, H_kv, blocks * page, D] and the same values scattered into a pool of pages."""
    cache = blocks * page
    k = rng.standard_normal((batch, kv_heads, cache, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, cache, dim)).astype(np.float32)
    num_pages = batch * blocks + 3  # a few pages nobody uses
    order = rng.permutation(num_pages)[: batch * blocks].reshape(batch, blocks)
    k_pages = rng.standard_normal((num_pages, kv_heads, page, dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, kv_heads, page, dim)).astype(np.float32)
    for b in range(batch):
        for j in range(blocks):
            k_pages[order[b, j]] = k[b, :, j * page : (j + 1) * page]
            v_pages[order[b, j]] = v[b, :, j * page : (j + 1) * page]
    q = rng.standard_normal((batch, steps, kv_heads * group, dim)).astype(np.float32)
    positions = np.array([[n + t for t in range(steps)] for n in before])
    lengths = np.array(before) + steps
    return q, k, v, k_pages, v_pages, order.astype(np.int32), positions, lengths


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    dim=st.sampled_from([4, 8]),
    page=st.sampled_from([1, 2, 4]),
    blocks=st.integers(2, 6),
    window=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 3),
    data=st.data(),
)
def test_paged_reference_matches_naive_attention(batch, kv_heads, group, dim, page, blocks, window, seed, steps, data):
    steps = min(steps, blocks * page)
    before = [data.draw(st.integers(0, blocks * page - steps)) for _ in range(batch)]
    rng = np.random.default_rng(seed)
    q, k, v, k_pages, v_pages, tables, positions, lengths = paged_case(
        rng, batch, kv_heads, group, dim, page, blocks, steps, before
    )
    out = ragged_paged_attention_ref(*map(jnp.asarray, (q, k_pages, v_pages, tables, positions, lengths)), window)
    expected = naive_attention(q, k, v, positions, lengths, window)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    page=st.sampled_from([1, 2, 4]),
    blocks=st.integers(3, 6),
    window=st.sampled_from([0, 3]),
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 4),
    data=st.data(),
)
def test_streaming_rows_see_their_sinks_and_recent_window(page, blocks, window, seed, steps, data):
    """Rows streaming from a drawn position (StreamingLLM's sinks and window, on top of a layer's sliding
    window) beside a row that does not stream, against the float64 loop; the dispatcher in interpret mode
    gives the same."""
    batch, steps = 3, min(steps, blocks * page)
    before = [data.draw(st.integers(0, blocks * page - steps)) for _ in range(batch)]
    rng = np.random.default_rng(seed)
    q, k, v, k_pages, v_pages, tables, positions, lengths = paged_case(rng, batch, 2, 2, 8, page, blocks, steps, before)
    starts = [data.draw(st.integers(0, int(length))) for length in lengths[:2]] + [np.iinfo(np.int32).max]
    sinks = [data.draw(st.integers(0, 3)) for _ in range(batch)]
    ring = [data.draw(st.integers(1, 5)) for _ in range(batch)]
    streaming = StreamingMask(*(jnp.asarray(x, jnp.int32) for x in (starts, sinks, ring)))
    args = tuple(map(jnp.asarray, (q, k_pages, v_pages, tables, positions, lengths)))
    out = ragged_paged_attention_ref(*args, window, streaming=streaming)
    expected = naive_attention(q, k, v, positions, lengths, window, (starts, sinks, ring))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)
    dispatched = ragged_paged_attention(*args, window, streaming=streaming, impl="interpret")
    np.testing.assert_array_equal(np.asarray(dispatched), np.asarray(out))


def test_dispatcher_in_interpret_mode_matches_the_reference():
    rng = np.random.default_rng(0)
    q, _, _, k_pages, v_pages, tables, positions, lengths = paged_case(rng, 2, 2, 2, 16, 8, 4, 3, [5, 20])
    args = tuple(map(jnp.asarray, (q, k_pages, v_pages, tables, positions, lengths)))
    expected = ragged_paged_attention_ref(*args)
    np.testing.assert_allclose(
        np.asarray(ragged_paged_attention(*args, impl="interpret")), np.asarray(expected), atol=2e-5, rtol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(ragged_paged_attention(*args, impl="xla")), np.asarray(expected))


def test_int8_pages_are_attention_over_their_dequantized_values():
    """Int8 pages with scales per position, head and 32 channels: the reference and the dispatcher
    (interpret mode) equal a naive float64 attention over codes x scales, and those values are within half
    a step of the float ones."""
    rng = np.random.default_rng(2)
    q, _, _, k_pages, v_pages, tables, positions, lengths = paged_case(rng, 2, 2, 2, 64, 4, 4, 2, [3, 12])
    k_pages[..., 5] *= 30  # an outlier channel: it sets the scale of its own group only
    (k_codes, k_scales), (v_codes, v_scales) = quantize_kv(jnp.asarray(k_pages)), quantize_kv(jnp.asarray(v_pages))
    assert k_codes.dtype == jnp.int8 and k_scales.shape == (*k_pages.shape[:3], 2)

    def back(codes, scales):
        grouped = np.asarray(codes, np.float64).reshape(*codes.shape[:-1], 2, 32) * np.asarray(scales)[..., None]
        return grouped.reshape(codes.shape)

    k_back, v_back = back(k_codes, k_scales), back(v_codes, v_scales)
    step = np.repeat(np.asarray(k_scales), 32, axis=-1)
    assert (np.abs(k_back - k_pages) <= step / 2 + 1e-6).all()
    assert np.abs(k_back - k_pages)[..., 32:].max() < np.abs(k_back - k_pages)[..., :32].max() / 10
    dense = [np.stack([np.concatenate(list(x[t]), axis=1) for t in tables]) for x in (k_back, v_back)]
    expected = naive_attention(q, *dense, positions, lengths, 0)
    args = [jnp.asarray(a) for a in (q, k_codes, v_codes, tables, positions, lengths)]
    for impl in ("xla", "interpret"):
        out = ragged_paged_attention(*args, 0, None, k_scales, v_scales, impl=impl)
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="int8 pages need k_scales"):
        ragged_paged_attention_ref(*args)
    assert np.asarray(quantize_kv(jnp.zeros((2, 4)))[1]).tolist() == [[1.0], [1.0]]  # all-zero vectors


def test_page_slots_address_each_new_token_and_drop_padding():
    tables = jnp.asarray([[7, 2, 5], [1, 0, 3]], jnp.int32)
    positions = jnp.asarray([[3, 4, 5], [0, 1, 2]], jnp.int32)
    valid = jnp.asarray([[True, True, False], [True, False, False]])
    pages, offsets = page_slots(tables, positions, valid, page_size=4, num_pages=9)
    assert np.asarray(pages).tolist() == [[7, 2, 9], [1, 9, 9]]  # 9: out of bounds, dropped by the scatter
    assert np.asarray(offsets).tolist() == [[3, 0, 1], [0, 1, 2]]


def test_bad_shapes_are_named():
    q = jnp.zeros((2, 1, 4, 8))
    pages = jnp.zeros((5, 2, 4, 8))
    with pytest.raises(ValueError, match="block_tables must be"):
        ragged_paged_attention_ref(q, pages, pages, jnp.zeros((3, 2), jnp.int32), jnp.zeros((2, 1)), jnp.ones(2))
    with pytest.raises(ValueError, match="does not fit pages"):
        ragged_paged_attention_ref(
            q, pages[..., :4], pages[..., :4], jnp.zeros((2, 2), jnp.int32), q[..., 0], q[:, 0, 0]
        )
