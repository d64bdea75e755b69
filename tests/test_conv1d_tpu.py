"""TPU (Mosaic) variant of the causal conv1d prefill, in TPU interpret mode against `causal_conv1d_ref` on
hypothesis-drawn ragged shapes, plus the Mosaic lowering on realistic shapes (no TPU needed for either).

Interpret mode fills the unaliased output with NaN, so `assert_close` catches unwritten elements. Small
block caps (16 steps, 128 channels) make ragged sizes span several time blocks (each reading the next
block's halo rows) and several channel blocks with a clipped edge one.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_checks import assert_close, assert_lowers_to_mosaic_tpu
from pallas_kernels import causal_conv1d as conv
from pallas_kernels.causal_conv1d import causal_conv1d_pallas_tpu, causal_conv1d_ref

S = jax.ShapeDtypeStruct
SMALL_BLOCKS = dict(block_t=16, block_c=128)


# Inputs drawn with numpy: eager jax.random would compile a little program per drawn shape.
def _inputs(seed, batch, steps, channels, taps, dtype, state_dtype, use_bias, use_state, use_counts):
    rng = np.random.default_rng(seed)
    normal = lambda shape, dt=dtype: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dt)  # noqa: E731
    return (normal((batch, steps, channels)), normal((channels, taps)), normal((channels,)) if use_bias else None,
            normal((batch, channels, taps - 1), state_dtype) if use_state else None,
            jnp.asarray(rng.integers(0, steps + 1, batch), jnp.int32) if use_counts else None)


def _check(got, want, dtype):
    (y, new), (y_ref, new_ref) = got, want
    assert y.dtype == y_ref.dtype and new.dtype == new_ref.dtype and new.shape == new_ref.shape
    assert_close(y, y_ref, dtype)
    assert_close(new, new_ref, dtype)  # the state is copied, rounded through x's dtype as in the reference


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 2), steps=st.sampled_from([1, 5, 16, 37]), channels=st.sampled_from([3, 130, 200]),
       taps=st.integers(2, 5), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), state_f32=st.booleans(),
       use_bias=st.booleans(), use_state=st.booleans(), use_counts=st.booleans(),
       activation=st.sampled_from([None, "silu"]), small=st.booleans(), seed=st.integers(0, 2**16))
def test_causal_conv1d_tpu_matches_reference(batch, steps, channels, taps, dtype, state_f32, use_bias, use_state,
                                             use_counts, activation, small, seed):
    args = _inputs(seed, batch, steps, channels, taps, dtype, jnp.float32 if state_f32 else dtype, use_bias,
                   use_state, use_counts)
    with mock.patch.dict(conv.CAUSAL_CONV1D_TPU, SMALL_BLOCKS if small else {}):
        got = causal_conv1d_pallas_tpu(*args, activation, interpret=True)
    _check(got, causal_conv1d_ref(*args, activation), dtype)


def test_causal_conv1d_tpu_long_kernel_and_blocks():
    """K = 10: the float32 halo is two sublane tiles (16 rows); 40 steps take 3 time blocks, 150 channels 2
    channel blocks."""
    args = _inputs(3, 2, 40, 150, 10, jnp.float32, jnp.float32, True, True, True)
    with mock.patch.dict(conv.CAUSAL_CONV1D_TPU, SMALL_BLOCKS):
        got = causal_conv1d_pallas_tpu(*args, interpret=True)
    _check(got, causal_conv1d_ref(*args), jnp.float32)


def test_causal_conv1d_dispatches_on_tpu_under_jit():
    """With the backend reported as TPU, the jitted dispatcher with impl="pallas" (and "auto") routes to
    the TPU variant (run here in interpret mode) and matches the reference."""
    args = _inputs(1, 2, 9, 16, 4, jnp.float32, jnp.float32, True, True, True)
    calls = []

    def interpreted(*a):
        calls.append(1)
        return causal_conv1d_pallas_tpu(*a, interpret=True)

    with (mock.patch.object(jax, "default_backend", lambda: "tpu"),
          mock.patch.object(conv, "causal_conv1d_pallas_tpu", interpreted)):
        for impl in ("pallas", "auto"):
            got = jax.jit(lambda *a, impl=impl: conv.causal_conv1d(*a, impl=impl))(*args)
            _check(got, causal_conv1d_ref(*args), jnp.float32)
    assert calls == [1, 1]


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_conv1d_tpu_lowers_to_mosaic(dtype):
    # Mamba-2 2.7B-like: conv over x, B, C (5120 + 2 * 128 channels, 11 blocks with a clipped edge one),
    # K = 4, bias, state and counts, 2048-step prefill (8 time blocks).
    channels = 5376
    assert_lowers_to_mosaic_tpu(lambda *a: causal_conv1d_pallas_tpu(*a), S((4, 2048, channels), dtype),
                                S((channels, 4), dtype), S((channels,), dtype), S((4, channels, 3), jnp.float32),
                                S((4,), jnp.int32))
    # Ragged: 1000 steps, 1100 channels, no bias / state (Mamba-1-like K = 4).
    assert_lowers_to_mosaic_tpu(lambda *a: causal_conv1d_pallas_tpu(*a), S((2, 1000, 1100), dtype),
                                S((1100, 4), dtype))
