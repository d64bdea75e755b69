"""Pallas causal conv1d kernels (prefill and decode step), in interpret mode, against their jnp references
on hypothesis-drawn shapes, dtypes and ragged counts; and their Triton lowering on realistic shapes.

The prefill test also draws small block sizes, so that short sequences span several time blocks, time
chunks (programs) and ragged channel blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, assert_close, assert_lowers_to_triton

from pallas_kernels.causal_conv1d import (
    CausalConv1dBlockSizes,
    CausalConv1dUpdateBlockSizes,
    causal_conv1d,
    causal_conv1d_pallas,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_pallas,
    causal_conv1d_update_ref,
)

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
# (channel block, time block, time blocks per program): the GPU defaults, and small ones.
BLOCKS = st.sampled_from(
    [None]
    + [
        CausalConv1dBlockSizes(block_c=c, block_t=t, blocks_per_program=p)
        for c, t, p in ((4, 2, 2), (8, 4, 1), (2, 1, 3))
    ]
)


def _normal(rng, shape, dtype):
    """Drawn with numpy: eager jax.random would compile a little program per drawn shape."""
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


# Interpret mode spends its time compiling (a few seconds per drawn shape), hence the small example counts.
@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.sampled_from([1, 2, 3, 7, 16, 21]),
    channels=st.sampled_from([1, 3, 8, 21]),
    taps=st.integers(2, 4),
    dtype=DTYPES,
    state_dtype=st.sampled_from([None, "x", jnp.float32]),
    use_bias=st.booleans(),
    activation=st.sampled_from([None, "silu"]),
    blocks=BLOCKS,
    data=st.data(),
)
def test_causal_conv1d_kernel_matches_reference(
    batch, steps, channels, taps, dtype, state_dtype, use_bias, activation, blocks, data
):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = _normal(rng, (batch, steps, channels), dtype)
    weight = _normal(rng, (channels, taps), dtype)
    bias = _normal(rng, (channels,), dtype) if use_bias else None
    state = (
        None
        if state_dtype is None
        else _normal(rng, (batch, channels, taps - 1), dtype if state_dtype == "x" else state_dtype)
    )
    # Ragged rows, including empty ones and ones shorter than the state (which reach back into it).
    counts = data.draw(st.none() | st.lists(st.integers(0, steps), min_size=batch, max_size=batch), label="counts")
    counts = None if counts is None else jnp.asarray(counts, jnp.int32)
    y, new_state = causal_conv1d(x, weight, bias, state, counts, activation, block_sizes=blocks, impl=IMPL)
    y_ref, new_state_ref = causal_conv1d_ref(x, weight, bias, state, counts, activation)
    assert y.dtype == y_ref.dtype and new_state.dtype == new_state_ref.dtype
    assert_close(y, y_ref, dtype)
    assert_close(new_state, new_state_ref, dtype)


# Blocks of 128 (the default) or 16 channels: ragged channel counts take one block or several.
@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.sampled_from([1, 6, 24, 130]),
    taps=st.integers(2, 4),
    dtype=DTYPES,
    state_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    use_bias=st.booleans(),
    activation=st.sampled_from([None, "silu"]),
    blocks=st.sampled_from([None, CausalConv1dUpdateBlockSizes(block_c=16)]),
    seed=st.integers(0, 2**16),
)
def test_causal_conv1d_update_kernel_matches_reference(
    batch, channels, taps, dtype, state_dtype, use_bias, activation, blocks, seed
):
    rng = np.random.default_rng(seed)
    x = _normal(rng, (batch, channels), dtype)
    weight = _normal(rng, (channels, taps), jnp.float32)
    bias = _normal(rng, (channels,), jnp.float32) if use_bias else None
    state = _normal(rng, (batch, channels, taps - 1), state_dtype)
    y, new_state = causal_conv1d_update(x, weight, bias, state, activation, block_sizes=blocks, impl=IMPL)
    y_ref, new_state_ref = causal_conv1d_update_ref(x, weight, bias, state, activation)
    assert y.dtype == x.dtype and new_state.dtype == state.dtype
    assert_close(y, y_ref, dtype)
    assert_close(new_state, new_state_ref, dtype)
    assert not np.array_equal(np.asarray(new_state), np.asarray(state))  # the aliased state was rewritten


def test_kernels_continue_a_sequence_under_jit():
    """Prefill in two jitted pieces, then a decode step, equals one reference prefill over the whole."""
    rng = np.random.default_rng(0)
    x = _normal(rng, (2, 11, 10), jnp.float32)
    weight, bias = _normal(rng, (10, 4), jnp.float32), _normal(rng, (10,), jnp.float32)
    prefill = jax.jit(lambda x, state, counts: causal_conv1d(x, weight, bias, state, counts, impl=IMPL))
    step = jax.jit(lambda x, state: causal_conv1d_update(x, weight, bias, state, impl=IMPL))
    y_first, state = prefill(x[:, :5], jnp.zeros((2, 10, 3)), jnp.array([5, 5]))
    y_second, state = prefill(x[:, 5:10], state, jnp.array([5, 5]))
    y_last, state = step(x[:, 10], state)
    y_ref, state_ref = causal_conv1d_ref(x, weight, bias)
    assert_close(jnp.concatenate([y_first, y_second, y_last[:, None]], axis=1), y_ref, jnp.float32)
    assert_close(state, state_ref, jnp.float32)


def test_kernels_give_clear_errors():
    x, weight = jnp.zeros((1, 4, 6)), jnp.zeros((6, 4))
    if jax.default_backend() == "cpu":  # on a GPU, impl="pallas" compiles
        with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
            causal_conv1d(x, weight, impl="pallas")
    with pytest.raises(ValueError, match=r"state must be \[1, 6, 3\], got \(1, 6, 2\)"):
        causal_conv1d(x, weight, state=jnp.zeros((1, 6, 2)), impl=IMPL)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        causal_conv1d_update(x[:, 0], weight, state=jnp.zeros((1, 6, 3)), activation="gelu", impl=IMPL)
    with pytest.raises(ValueError, match="needs the conv state"):
        causal_conv1d_update(x[:, 0], weight, impl=IMPL)
    # K = 1 and T = 0: the kernel refuses, "auto" takes the reference.
    with pytest.raises(ValueError, match="needs K >= 2 taps and T >= 1 steps, got K=1, T=4"):
        causal_conv1d(x, jnp.ones((6, 1)), impl=IMPL)
    with pytest.raises(ValueError, match="needs K >= 2 taps, got K=1"):
        causal_conv1d_update(x[:, 0], jnp.ones((6, 1)), state=jnp.zeros((1, 6, 0)), impl=IMPL)
    y, new_state = causal_conv1d(x[:, :0], weight, state=jnp.ones((1, 6, 3)))
    assert y.shape == (1, 0, 6) and np.array_equal(np.asarray(new_state), np.ones((1, 6, 3)))
    with pytest.raises(ValueError, match="CausalConv1dBlockSizes: block_t must be a power of two >= 1, got 3"):
        CausalConv1dBlockSizes(block_t=3)


def test_kernels_lower_to_triton_for_gpu():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    counts = jax.ShapeDtypeStruct((4,), jnp.int32)
    # Mamba-2 conv_dim 3328 (not a power of two) with everything; Mamba-1 d_inner without bias / state.
    assert_lowers_to_triton(
        causal_conv1d_pallas, bf16(4, 4096, 3328), bf16(3328, 4), bf16(3328), f32(4, 3328, 3), counts
    )
    assert_lowers_to_triton(causal_conv1d_pallas, f32(1, 77, 1536), f32(1536, 4))
    assert_lowers_to_triton(lambda x, w: causal_conv1d_pallas(x, w, activation=None), bf16(16, 1, 1792), f32(1792, 2))
    assert_lowers_to_triton(causal_conv1d_update_pallas, bf16(16, 1792), bf16(1792, 4), bf16(1792), bf16(16, 1792, 3))
    assert_lowers_to_triton(causal_conv1d_update_pallas, f32(1, 4096), f32(4096, 3), None, f32(1, 4096, 2))
