"""The block-sparse attention reference against a float64 loop over every query and key (hypothesis shapes:
GQA, ragged lengths, sliding windows, repeated / negative / out-of-range indices), and equal to flash attention
when every block is listed."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, random_prefill_inputs

from pallas_kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_ref
from pallas_kernels.flash_attention import flash_attention_ref


def naive_block_sparse(q, k, v, blocks, columns, lengths, window, block):
    """Float64: query t of head h sees key s when causal, within the length and window, and s's block is
    listed for t's block or s is a listed column."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    blocks, columns = np.asarray(blocks), None if columns is None else np.asarray(columns)
    batch, steps, heads, dim = q.shape
    rep = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for t in range(steps):
                listed = set(blocks[b, h, t // block].tolist())
                cols = set() if columns is None else set(columns[b, h].tolist())
                seen = [
                    s
                    for s in range(steps)
                    if s <= t
                    and s < lengths[b]
                    and (window <= 0 or s > t - window)
                    and (s // block in listed or s in cols)
                ]
                if seen:
                    scores = k[b, seen, h // rep] @ q[b, t, h] / np.sqrt(dim)
                    w = np.exp(scores - scores.max())
                    out[b, t, h] = (w / w.sum()) @ v[b, seen, h // rep]
    return out


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 50),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    block=st.sampled_from([4, 8, 16]),
    width=st.integers(1, 4),
    n_columns=st.sampled_from([0, 1, 6]),
    window=st.sampled_from([0, 3, 20]),
    data=st.data(),
)
def test_reference_matches_a_loop_over_every_key(batch, steps, heads, block, width, n_columns, window, data):
    kv_heads, group = heads
    q, k, v = random_prefill_inputs(data.draw(st.integers(0, 2**16)), batch, steps, kv_heads, group, 8, jnp.float32)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    n_blocks = -(-steps // block)
    blocks = rng.integers(-2, n_blocks + 2, (batch, kv_heads * group, n_blocks, width))  # repeats, -1s, too large
    columns = rng.integers(-2, steps + 2, (batch, kv_heads * group, n_columns)) if n_columns else None
    lengths = np.array([data.draw(st.integers(0, steps)) for _ in range(batch)])
    got = block_sparse_attention_ref(
        q,
        k,
        v,
        jnp.asarray(blocks),
        None if columns is None else jnp.asarray(columns),
        jnp.asarray(lengths),
        window,
        block=block,
    )
    want = naive_block_sparse(q, k, v, blocks, columns, lengths, window, block)
    assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("window", [0, 9])
def test_every_block_listed_is_flash_attention(window):
    q, k, v = random_prefill_inputs(1, 2, 37, 2, 3, 16, jnp.float32)
    n_blocks = -(-37 // 8)
    blocks = jnp.broadcast_to(jnp.arange(n_blocks)[::-1], (2, 6, n_blocks, n_blocks))
    lengths = jnp.array([37, 20])
    want = flash_attention_ref(q, k, v, window, lengths=lengths)
    assert_close(block_sparse_attention(q, k, v, blocks, None, lengths, window, block=8), want, jnp.float32)
    # The same keys as columns only (no block listed): the same output.
    columns = jnp.broadcast_to(jnp.arange(37), (2, 6, 37))
    none = jnp.full((2, 6, n_blocks, 1), -1)
    assert_close(block_sparse_attention(q, k, v, none, columns, lengths, window, block=8), want, jnp.float32)


def test_bad_shapes_raise():
    q, k, v = random_prefill_inputs(0, 1, 20, 1, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"blocks must be \[B, H, ceil\(T / block\), K\] = \[1, 2, 3, K\]"):
        block_sparse_attention(q, k, v, jnp.zeros((1, 2, 2, 1), jnp.int32), block=8)
    with pytest.raises(ValueError, match=r"columns must be \[B, H, C\] = \[1, 2, C\]"):
        block_sparse_attention(q, k, v, jnp.zeros((1, 2, 3, 1), jnp.int32), jnp.zeros((1, 3, 4), jnp.int32), block=8)
    with pytest.raises(ValueError, match="block must be >= 1"):
        block_sparse_attention(q, k, v, jnp.zeros((1, 2, 3, 1), jnp.int32), block=0)
