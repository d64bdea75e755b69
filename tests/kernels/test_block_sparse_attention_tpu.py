"""The Mosaic TPU block-sparse attention in TPU interpret mode against its jnp reference (hypothesis shapes: GQA,
ragged lengths, windows, dtypes, repeated and missing indices, columns), the dispatcher's route to it on TPU,
and its lowering to Mosaic TPU on this CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, dispatch_on_tpu, random_prefill_inputs

from pallas_kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_pallas_tpu,
    block_sparse_attention_ref,
)


def random_indices(rng, batch, heads, steps, block, width, n_columns):
    n_blocks = -(-steps // block)
    blocks = jnp.asarray(rng.integers(-1, n_blocks + 1, (batch, heads, n_blocks, width)))
    columns = jnp.asarray(rng.integers(-1, steps, (batch, heads, n_columns))) if n_columns else None
    return blocks, columns


@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 50),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    width=st.integers(1, 3),
    n_columns=st.sampled_from([0, 5, 130]),
    window=st.sampled_from([0, 7]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    data=st.data(),
)
def test_tpu_kernel_matches_reference(batch, steps, heads, width, n_columns, window, dtype, data):
    kv_heads, group = heads
    q, k, v = random_prefill_inputs(data.draw(st.integers(0, 2**16)), batch, steps, kv_heads, group, 16, dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    blocks, columns = random_indices(rng, batch, kv_heads * group, steps, 16, width, n_columns)
    lengths = jnp.asarray([data.draw(st.integers(0, steps)) for _ in range(batch)])
    got = block_sparse_attention_pallas_tpu(q, k, v, blocks, columns, lengths, window, block=16, interpret=True)
    assert got.dtype == dtype
    assert_close(got, block_sparse_attention_ref(q, k, v, blocks, columns, lengths, window, block=16), dtype)


def test_dispatcher_uses_tpu_variant_on_tpu():
    q, k, v = random_prefill_inputs(2, 1, 40, 1, 2, 16, jnp.float32)
    blocks, columns = random_indices(np.random.default_rng(0), 1, 2, 40, 16, 2, 6)
    got = dispatch_on_tpu(
        block_sparse_attention, "block_sparse_attention_pallas_tpu", q, k, v, blocks, columns, block=16
    )
    assert_close(got, block_sparse_attention_ref(q, k, v, blocks, columns, block=16), jnp.float32)
    with pytest.raises(ValueError, match="needs a block that is a multiple of 16, got 8"):
        block_sparse_attention_pallas_tpu(q, k, v, jnp.zeros((1, 2, 5, 1), jnp.int32), block=8, interpret=True)


def test_tpu_kernel_lowers_to_mosaic():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    # SmolLM2-135M (9 heads, 3 kv heads, head_dim 64), a 1000-token prefill: 8 blocks of 64 + 256 columns.
    assert_lowers_to_mosaic_tpu(
        lambda q, k, v, b, c, n: block_sparse_attention_pallas_tpu(q, k, v, b, c, n),
        bf16(1, 1000, 9, 64),
        bf16(1, 1000, 3, 64),
        bf16(1, 1000, 3, 64),
        i32(1, 9, 16, 8),
        i32(1, 9, 256),
        i32(1),
    )
