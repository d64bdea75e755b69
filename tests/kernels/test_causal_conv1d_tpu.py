"""TPU (Mosaic) variants of the causal conv1d prefill and decode step, in TPU interpret mode against their
references on hypothesis-drawn ragged shapes, their dispatch on TPU, and the Mosaic lowering on realistic
shapes (no TPU needed for either).

Interpret mode fills the unaliased output with NaN, so `assert_close` catches unwritten elements; the
aliased decode state is checked to be the new state, not the old one. Small block caps (16 steps, 128
channels; 16 channels for the decode step) make ragged sizes span several time blocks (each reading
the next block's halo rows) and several channel blocks with a clipped edge one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu, assert_step_close, dispatch_on_tpu

from pallas_kernels.causal_conv1d import (
    CausalConv1dTPUBlockSizes,
    CausalConv1dUpdateTPUBlockSizes,
    causal_conv1d,
    causal_conv1d_pallas_tpu,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_pallas_tpu,
    causal_conv1d_update_ref,
)

S = jax.ShapeDtypeStruct
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
SMALL_BLOCKS = CausalConv1dTPUBlockSizes(block_t=16, block_c=128)


# Inputs drawn with numpy: eager jax.random would compile a little program per drawn shape.
def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


def _inputs(seed, batch, steps, channels, taps, dtype, state_dtype, use_bias, use_state, use_counts):
    rng = np.random.default_rng(seed)
    return (
        _normal(rng, (batch, steps, channels), dtype),
        _normal(rng, (channels, taps), dtype),
        _normal(rng, (channels,), dtype) if use_bias else None,
        _normal(rng, (batch, channels, taps - 1), state_dtype) if use_state else None,
        jnp.asarray(rng.integers(0, steps + 1, batch), jnp.int32) if use_counts else None,
    )


def _update_inputs(seed, batch, channels, taps, dtype, state_dtype, use_bias):
    rng = np.random.default_rng(seed)
    return (
        _normal(rng, (batch, channels), dtype),
        _normal(rng, (channels, taps), dtype),
        _normal(rng, (channels,), dtype) if use_bias else None,
        _normal(rng, (batch, channels, taps - 1), state_dtype),
    )


def _check(got, want, dtype):
    (y, new), (y_ref, new_ref) = got, want
    assert y.dtype == y_ref.dtype and new.dtype == new_ref.dtype and new.shape == new_ref.shape
    assert_close(y, y_ref, dtype)
    assert_close(new, new_ref, dtype)  # the state is copied, rounded through x's dtype as in the reference


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.sampled_from([1, 5, 16, 37]),
    channels=st.sampled_from([3, 130, 200]),
    taps=st.integers(2, 5),
    dtype=DTYPES,
    state_f32=st.booleans(),
    use_bias=st.booleans(),
    use_state=st.booleans(),
    use_counts=st.booleans(),
    activation=st.sampled_from([None, "silu"]),
    small=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_conv1d_tpu_matches_reference(
    batch, steps, channels, taps, dtype, state_f32, use_bias, use_state, use_counts, activation, small, seed
):
    args = _inputs(
        seed, batch, steps, channels, taps, dtype, jnp.float32 if state_f32 else dtype, use_bias, use_state, use_counts
    )
    got = causal_conv1d_pallas_tpu(*args, activation, block_sizes=SMALL_BLOCKS if small else None, interpret=True)
    _check(got, causal_conv1d_ref(*args, activation), dtype)


def test_causal_conv1d_tpu_long_kernel_and_blocks():
    """K = 10: the float32 halo is two sublane tiles (16 rows); 40 steps take 3 time blocks, 150 channels 2
    channel blocks."""
    args = _inputs(3, 2, 40, 150, 10, jnp.float32, jnp.float32, True, True, True)
    _check(
        causal_conv1d_pallas_tpu(*args, block_sizes=SMALL_BLOCKS, interpret=True), causal_conv1d_ref(*args), jnp.float32
    )


# A small channel-block cap (16) makes ragged channel counts take several blocks or a full-dim one.
@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.sampled_from([3, 21, 64]),
    taps=st.integers(2, 4),
    dtype=DTYPES,
    state_f32=st.booleans(),
    use_bias=st.booleans(),
    activation=st.sampled_from([None, "silu"]),
    cap=st.sampled_from([16, 512]),
    seed=st.integers(0, 2**16),
)
def test_causal_conv1d_update_tpu_matches_reference(
    batch, channels, taps, dtype, state_f32, use_bias, activation, cap, seed
):
    args = _update_inputs(seed, batch, channels, taps, dtype, jnp.float32 if state_f32 else dtype, use_bias)
    got = causal_conv1d_update_pallas_tpu(
        *args, activation, block_sizes=CausalConv1dUpdateTPUBlockSizes(block_c=cap), interpret=True
    )
    assert_step_close(got, causal_conv1d_update_ref(*args, activation), args[3], dtype)


def test_dispatchers_use_tpu_variants_on_tpu():
    """The jitted dispatchers' "pallas" and "auto" route to the TPU variants (with their block sizes: 8-channel
    decode blocks, several per sequence) and match the reference."""
    args = _inputs(1, 2, 9, 16, 4, jnp.float32, jnp.float32, True, True, True)
    got = dispatch_on_tpu(causal_conv1d, "causal_conv1d_pallas_tpu", *args, block_sizes=SMALL_BLOCKS)
    _check(got, causal_conv1d_ref(*args), jnp.float32)
    args = _update_inputs(2, 2, 16, 4, jnp.float32, jnp.float32, False)
    got = dispatch_on_tpu(
        causal_conv1d_update,
        "causal_conv1d_update_pallas_tpu",
        *args,
        block_sizes=CausalConv1dUpdateTPUBlockSizes(block_c=8),
    )
    assert_step_close(got, causal_conv1d_update_ref(*args), args[3], jnp.float32)


def test_causal_conv1d_tpu_rejects_bad_input():
    x = jnp.ones((1, 4, 8))
    with pytest.raises(ValueError, match="K >= 2"):
        causal_conv1d_pallas_tpu(x, jnp.ones((8, 1)), interpret=True)
    with pytest.raises(ValueError, match="T >= 1"):
        causal_conv1d_pallas_tpu(jnp.ones((1, 0, 8)), jnp.ones((8, 4)), interpret=True)
    with pytest.raises(ValueError, match="state must be"):
        causal_conv1d_pallas_tpu(x, jnp.ones((8, 4)), None, jnp.ones((1, 8, 4)), interpret=True)
    with pytest.raises(ValueError, match="unknown activation"):
        causal_conv1d_pallas_tpu(x, jnp.ones((8, 4)), activation="gelu", interpret=True)
    x, weight = jnp.ones((1, 4)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match="needs the conv state"):
        causal_conv1d_update_pallas_tpu(x, weight, interpret=True)
    with pytest.raises(ValueError, match="K >= 2"):
        causal_conv1d_update_pallas_tpu(x, jnp.ones((4, 1)), None, jnp.ones((1, 4, 0)), interpret=True)
    with pytest.raises(ValueError, match="CausalConv1dTPUBlockSizes: block_c must be a positive multiple of 128"):
        CausalConv1dTPUBlockSizes(block_c=100)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_conv1d_tpu_lowers_to_mosaic(dtype):
    # Mamba-2 2.7B-like: conv over x, B, C (5120 + 2 * 128 channels, 11 blocks with a clipped edge one),
    # K = 4, bias, state and counts, 2048-step prefill (8 time blocks); and its decode step.
    channels = 5376
    assert_lowers_to_mosaic_tpu(
        lambda *a: causal_conv1d_pallas_tpu(*a),
        S((4, 2048, channels), dtype),
        S((channels, 4), dtype),
        S((channels,), dtype),
        S((4, channels, 3), jnp.float32),
        S((4,), jnp.int32),
    )
    assert_lowers_to_mosaic_tpu(
        lambda *a: causal_conv1d_update_pallas_tpu(*a),
        S((8, channels), dtype),
        S((channels, 4), dtype),
        S((channels,), dtype),
        S((8, channels, 3), dtype),
    )
    # Ragged: 1000 steps, 1100 channels, no bias / state (Mamba-1-like K = 4).
    assert_lowers_to_mosaic_tpu(lambda *a: causal_conv1d_pallas_tpu(*a), S((2, 1000, 1100), dtype), S((1100, 4), dtype))
