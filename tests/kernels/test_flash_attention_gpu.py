"""The Pallas (Triton) prefill flash attention in interpret mode against its jnp reference, on
hypothesis-drawn shapes (GQA), ragged lengths, windows, dtypes and block sizes; jit, dispatch fallbacks
and errors, and its Triton lowering for GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, assert_close, assert_lowers_to_triton, random_prefill_inputs

from pallas_kernels.flash_attention import (
    FlashAttentionBlockSizes,
    FlashAttentionTPUBlockSizes,
    flash_attention,
    flash_attention_pallas,
    flash_attention_ref,
)


# Small blocks (16 queries, 32 keys) make short sequences span several query and key blocks.
@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 70),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    dim=st.sampled_from([16, 32]),
    window=st.sampled_from([0, 1, 5, 70]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    blocks=st.sampled_from([None, FlashAttentionBlockSizes(block_q=16, block_k=32)]),
    data=st.data(),
)
def test_flash_attention_kernel_matches_reference(batch, steps, heads, dim, window, dtype, blocks, data):
    lengths = jnp.array([data.draw(st.integers(0, steps)) for _ in range(batch)])
    q, k, v = random_prefill_inputs(data.draw(st.integers(0, 2**16)), batch, steps, *heads, dim, dtype)
    got = flash_attention(q, k, v, window, lengths=lengths, block_sizes=blocks, impl=IMPL)
    assert got.dtype == dtype
    assert_close(got, flash_attention_ref(q, k, v, window, lengths=lengths), dtype)


def test_flash_attention_runs_under_jit_with_traced_window():
    q, k, v = random_prefill_inputs(3, 1, 20, 2, 2, 16, jnp.float32)
    run = jax.jit(lambda q, w: flash_attention(q, k, v, w, impl=IMPL))
    assert_close(run(q, 4), flash_attention_ref(q, k, v, 4), jnp.float32)


def test_flash_attention_dispatch_fallbacks_and_errors():
    q = jnp.ones((1, 2, 2, 8))  # head_dim 8: too small for Triton's dot
    k = jnp.ones((1, 2, 1, 8))
    np.testing.assert_array_equal(flash_attention(q, k, k, impl="auto"), flash_attention_ref(q, k, k))
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16, got 8"):
        flash_attention(q, k, k, impl=IMPL)
    q, k = jnp.ones((1, 2, 2, 16)), jnp.ones((1, 2, 1, 16))
    with pytest.raises(ValueError, match=r"lengths must be \[1\]"):
        flash_attention(q, k, k, lengths=jnp.array([1, 2]), impl=IMPL)
    with pytest.raises(ValueError, match="flash_attention: block_sizes must be a FlashAttentionBlockSizes"):
        flash_attention(q, k, k, block_sizes=FlashAttentionTPUBlockSizes(), impl=IMPL)
    with pytest.raises(ValueError, match="FlashAttentionBlockSizes: block_q must be a power of two >= 16, got 48"):
        FlashAttentionBlockSizes(block_q=48)
    with pytest.raises(ValueError, match="FlashAttentionBlockSizes: num_warps must be a positive int, got 0"):
        FlashAttentionBlockSizes(num_warps=0)


def test_flash_attention_lowers_to_triton_for_gpu():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    # SmolLM2-135M shapes (9 heads, 3 kv heads, head_dim 64): a 1000-token prefill.
    assert_lowers_to_triton(
        lambda q, k, v, n: flash_attention_pallas(q, k, v, 0, None, n),
        bf16(2, 1000, 9, 64),
        bf16(2, 1000, 3, 64),
        bf16(2, 1000, 3, 64),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
