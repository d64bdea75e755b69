"""The Pallas (Triton) block-sparse attention in interpret mode against its jnp reference on hypothesis shapes
(GQA, ragged lengths, windows, dtypes, repeated and missing indices, column blocks), dispatch fallbacks and its
Triton lowering for GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, assert_close, assert_lowers_to_triton, random_prefill_inputs

from pallas_kernels.block_sparse_attention import (
    BlockSparseBlockSizes,
    block_sparse_attention,
    block_sparse_attention_pallas,
    block_sparse_attention_ref,
)


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 70),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    width=st.integers(1, 3),
    n_columns=st.sampled_from([0, 5, 20]),
    window=st.sampled_from([0, 7, 70]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    data=st.data(),
)
def test_kernel_matches_reference(batch, steps, heads, width, n_columns, window, dtype, data):
    kv_heads, group = heads
    q, k, v = random_prefill_inputs(data.draw(st.integers(0, 2**16)), batch, steps, kv_heads, group, 16, dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    block = 16
    n_blocks = -(-steps // block)
    blocks = jnp.asarray(rng.integers(-1, n_blocks + 1, (batch, kv_heads * group, n_blocks, width)))
    columns = jnp.asarray(rng.integers(-1, steps, (batch, kv_heads * group, n_columns))) if n_columns else None
    lengths = jnp.asarray([data.draw(st.integers(0, steps)) for _ in range(batch)])
    sizes = BlockSparseBlockSizes(block_c=16)
    got = block_sparse_attention(q, k, v, blocks, columns, lengths, window, block=block, block_sizes=sizes, impl=IMPL)
    assert got.dtype == dtype
    assert_close(got, block_sparse_attention_ref(q, k, v, blocks, columns, lengths, window, block=block), dtype)


def test_dispatch_falls_back_where_the_kernel_cannot_run():
    q, k, v = random_prefill_inputs(0, 1, 20, 1, 2, 8, jnp.float32)  # head_dim 8: too small for Triton's dot
    blocks = jnp.zeros((1, 2, 3, 1), jnp.int32)
    np.testing.assert_array_equal(
        block_sparse_attention(q, k, v, blocks, block=8, impl="auto"),
        block_sparse_attention_ref(q, k, v, blocks, block=8),
    )
    with pytest.raises(ValueError, match="power-of-two head_dim and block >= 16, got 8 and 8"):
        block_sparse_attention(q, k, v, blocks, block=8, impl=IMPL)
    with pytest.raises(ValueError, match="BlockSparseBlockSizes: block_c must be a power of two >= 16, got 24"):
        BlockSparseBlockSizes(block_c=24)


def test_lowers_to_triton_for_gpu():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    # SmolLM2-135M shapes (9 heads, 3 kv heads, head_dim 64): a 1000-token prefill, 10 blocks + 100 columns.
    assert_lowers_to_triton(
        lambda q, k, v, b, c, n: block_sparse_attention_pallas(q, k, v, b, c, n),
        bf16(1, 1000, 9, 64),
        bf16(1, 1000, 3, 64),
        bf16(1, 1000, 3, 64),
        i32(1, 9, 16, 10),
        i32(1, 9, 100),
        i32(1),
    )
