"""The Mosaic TPU variant of the prefill flash attention, in TPU interpret mode, against the jnp
reference (GQA, ragged lengths, sliding window, T not a multiple of the block), the dispatch on TPU,
and its lowering for TPU on realistic shapes (this CPU machine lowers to a Mosaic custom call without a TPU).
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, dispatch_on_tpu, random_prefill_inputs

from pallas_kernels.flash_attention import (
    FlashAttentionTPUBlockSizes,
    flash_attention,
    flash_attention_pallas_tpu,
    flash_attention_ref,
)

SMALL_BLOCKS = FlashAttentionTPUBlockSizes(block=16)


# Block 16 (the smallest) so that tiny shapes span several query and key blocks and skip some.
@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 40),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dim=st.sampled_from([8, 32]),
    window=st.sampled_from([0, 1, 5, 40]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    data=st.data(),
)
def test_tpu_kernel_matches_reference(batch, steps, heads, dim, window, dtype, data):
    lengths = jnp.array([data.draw(st.integers(0, steps)) for _ in range(batch)])
    q, k, v = random_prefill_inputs(data.draw(st.integers(0, 2**16)), batch, steps, *heads, dim, dtype)
    got = flash_attention_pallas_tpu(q, k, v, window, lengths=lengths, block_sizes=SMALL_BLOCKS, interpret=True)
    assert got.dtype == dtype
    assert_close(got, flash_attention_ref(q, k, v, window, lengths=lengths), dtype)


def test_tpu_kernel_skips_blocks_outside_window_and_length():
    # 4 blocks of 16: with window 5 each query block sees at most 2 key blocks; the first sequence
    # ends at 20 (later query blocks see only its first 2 key blocks), the second is empty (zeros).
    q, k, v = random_prefill_inputs(1, 2, 50, 1, 2, 16, jnp.float32)
    lengths = jnp.array([20, 0])
    got = flash_attention_pallas_tpu(q, k, v, 5, 0.3, lengths, block_sizes=SMALL_BLOCKS, interpret=True)
    assert_close(got, flash_attention_ref(q, k, v, 5, 0.3, lengths), jnp.float32)
    assert not got[1].any()


def test_tpu_kernel_runs_under_jit_with_traced_window():
    q, k, v = random_prefill_inputs(3, 1, 20, 2, 2, 16, jnp.float32)
    run = jax.jit(lambda q, w: flash_attention_pallas_tpu(q, k, v, w, interpret=True))
    assert_close(run(q, 4), flash_attention_ref(q, k, v, 4), jnp.float32)


def test_tpu_kernel_rejects_bad_input():
    q, k, v = random_prefill_inputs(0, 1, 4, 1, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="FlashAttentionTPUBlockSizes: block must be a positive multiple of 16"):
        FlashAttentionTPUBlockSizes(block=24)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of kv heads \(3\)"):
        flash_attention_pallas_tpu(q, *random_prefill_inputs(0, 1, 4, 3, 1, 16, jnp.float32)[1:], interpret=True)
    with pytest.raises(ValueError, match=r"lengths must be \[1\]"):
        flash_attention_pallas_tpu(q, k, v, lengths=jnp.array([1, 2]), interpret=True)


def test_dispatcher_uses_tpu_variant_on_tpu():
    q, k, v = random_prefill_inputs(2, 1, 20, 2, 2, 16, jnp.float32)
    got = dispatch_on_tpu(flash_attention, "flash_attention_pallas_tpu", q, k, v, block_sizes=SMALL_BLOCKS, window=3)
    assert_close(got, flash_attention_ref(q, k, v, 3), jnp.float32)


def test_tpu_kernel_lowers_to_mosaic():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    # SmolLM2-135M (9 heads, 3 kv heads, head_dim 64), 1000-token prefill: T padded to 1024.
    assert_lowers_to_mosaic_tpu(
        lambda q, k, v, n: flash_attention_pallas_tpu(q, k, v, 0, None, n),
        bf16(2, 1000, 9, 64),
        bf16(2, 1000, 3, 64),
        bf16(2, 1000, 3, 64),
        i32(2),
    )
    # Llama-3-8B-like (32 heads, 8 kv heads, head_dim 128) in float32 with a traced sliding window.
    f32 = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.float32)
    assert_lowers_to_mosaic_tpu(
        lambda q, k, v, w, n: flash_attention_pallas_tpu(q, k, v, w, None, n), f32, kv, kv, i32(), i32(1)
    )
