"""TPU (Mosaic) variants of the SSM decode steps: SSD step (Mamba-2), selective state update (Mamba-1)
and the causal conv update, in TPU interpret mode against their jnp references on hypothesis-drawn
ragged shapes, plus the Mosaic lowering on realistic shapes (no TPU needed for either).

Interpret mode fills every output the kernel does not alias with NaN, so `assert_close` catches
unwritten elements; the aliased state is checked to be the new state, not the old one.
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
from pallas_kernels import selective_scan, ssd
from pallas_kernels.causal_conv1d import causal_conv1d_update_pallas_tpu, causal_conv1d_update_ref
from pallas_kernels.selective_scan import selective_state_update_pallas_tpu, selective_state_update_ref
from pallas_kernels.ssd import ssd_step_pallas_tpu, ssd_step_ref

DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
S = jax.ShapeDtypeStruct


# Inputs drawn with numpy: eager jax.random would compile a little program per drawn shape.
def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


def _dt_and_a(rng, dt_shape, a_shape):  # dt > 0 (softplus'ed), A < 0
    return jnp.asarray(np.log1p(np.exp(rng.standard_normal(dt_shape) - 1.0)), jnp.float32), \
        jnp.asarray(-np.exp(rng.standard_normal(a_shape)), jnp.float32)


def _ssd_inputs(seed, batch, heads, groups, head_dim, n, dtype, state_dtype, use_d):
    rng = np.random.default_rng(seed)
    state, x = _normal(rng, (batch, heads, head_dim, n), state_dtype), _normal(rng, (batch, heads, head_dim), dtype)
    dt, A = _dt_and_a(rng, (batch, heads), (heads,))
    return (state, x, dt, A, _normal(rng, (batch, groups, n), dtype), _normal(rng, (batch, groups, n), dtype),
            _normal(rng, (heads,)) if use_d else None)


def _mamba1_inputs(seed, batch, channels, n, dtype, use_d, use_z):
    rng = np.random.default_rng(seed)
    state, x = _normal(rng, (batch, channels, n)), _normal(rng, (batch, channels), dtype)
    dt, A = _dt_and_a(rng, (batch, channels), (channels, n))
    return (state, x, dt, A, _normal(rng, (batch, n), dtype), _normal(rng, (batch, n), dtype),
            _normal(rng, (channels,)) if use_d else None, _normal(rng, (batch, channels), dtype) if use_z else None)


def _check_step(got, want, state, dtype):
    (y, new), (y_ref, new_ref) = got, want
    assert y.dtype == y_ref.dtype and new.dtype == state.dtype and new.shape == state.shape
    assert_close(y, y_ref, dtype)
    assert_close(new, new_ref, dtype if state.dtype == jnp.float32 else jnp.bfloat16)
    assert not np.array_equal(np.asarray(new, np.float32), np.asarray(state, np.float32))  # state rewritten


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 2), heads_per_group=st.integers(1, 2), groups=st.integers(1, 2),
       head_dim=st.sampled_from([1, 3, 8]), n=st.sampled_from([1, 5, 16]), dtype=DTYPES, state_bf16=st.booleans(),
       use_d=st.booleans(), seed=st.integers(0, 2**16))
def test_ssd_step_tpu_matches_reference(batch, heads_per_group, groups, head_dim, n, dtype, state_bf16, use_d, seed):
    state_dtype = jnp.bfloat16 if state_bf16 else jnp.float32
    args = _ssd_inputs(seed, batch, heads_per_group * groups, groups, head_dim, n, dtype, state_dtype, use_d)
    _check_step(ssd_step_pallas_tpu(*args, interpret=True), ssd_step_ref(*args), args[0], dtype)


# A small channel-block cap (16) makes ragged channel counts take several blocks or a full-dim one.
@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 2), channels=st.sampled_from([6, 21, 48]), n=st.sampled_from([1, 4, 16]), dtype=DTYPES,
       use_d=st.booleans(), use_z=st.booleans(), cap=st.sampled_from([16, 512]), seed=st.integers(0, 2**16))
def test_selective_state_update_tpu_matches_reference(batch, channels, n, dtype, use_d, use_z, cap, seed):
    args = _mamba1_inputs(seed, batch, channels, n, dtype, use_d, use_z)
    with mock.patch.object(selective_scan, "SELECTIVE_STATE_UPDATE_TPU_BLOCK", cap):
        got = selective_state_update_pallas_tpu(*args, interpret=True)
    _check_step(got, selective_state_update_ref(*args), args[0], dtype)


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 2), channels=st.sampled_from([3, 21, 64]), taps=st.integers(2, 4), dtype=DTYPES,
       state_f32=st.booleans(), use_bias=st.booleans(), activation=st.sampled_from([None, "silu"]),
       cap=st.sampled_from([16, 512]), seed=st.integers(0, 2**16))
def test_causal_conv1d_update_tpu_matches_reference(batch, channels, taps, dtype, state_f32, use_bias, activation,
                                                    cap, seed):
    rng = np.random.default_rng(seed)
    x, weight = _normal(rng, (batch, channels), dtype), _normal(rng, (channels, taps), dtype)
    bias = _normal(rng, (channels,), dtype) if use_bias else None
    state = _normal(rng, (batch, channels, taps - 1), jnp.float32 if state_f32 else dtype)
    with mock.patch.object(conv, "CAUSAL_CONV1D_UPDATE_TPU_BLOCK", cap):
        got = causal_conv1d_update_pallas_tpu(x, weight, bias, state, activation, interpret=True)
    _check_step(got, causal_conv1d_update_ref(x, weight, bias, state, activation), state, dtype)


def test_tpu_steps_dispatch_on_tpu_under_jit():
    """With the backend reported as TPU, the jitted dispatchers with impl="pallas" route to the TPU
    variants (run here in interpret mode, with 8-channel blocks: several per sequence) and match the reference."""
    ssd_args = _ssd_inputs(0, 2, 4, 2, 8, 16, jnp.float32, jnp.float32, True)
    m1_args = _mamba1_inputs(1, 2, 24, 16, jnp.float32, True, True)
    rng = np.random.default_rng(2)
    conv_args = (_normal(rng, (2, 16)), _normal(rng, (16, 4)), None, _normal(rng, (2, 16, 3)))
    cases = [(ssd, "ssd_step", ssd_args, ssd_step_ref(*ssd_args), ssd_args[0]),
             (selective_scan, "selective_state_update", m1_args, selective_state_update_ref(*m1_args), m1_args[0]),
             (conv, "causal_conv1d_update", conv_args, causal_conv1d_update_ref(*conv_args), conv_args[3])]
    for module, name, args, want, state in cases:
        calls = []

        def interpreted(*a, f=getattr(module, f"{name}_pallas_tpu"), calls=calls):
            calls.append(1)
            return f(*a, interpret=True)

        with (mock.patch.object(jax, "default_backend", lambda: "tpu"),
              mock.patch.object(module, f"{name}_pallas_tpu", interpreted),
              mock.patch.object(selective_scan, "SELECTIVE_STATE_UPDATE_TPU_BLOCK", 8),
              mock.patch.object(conv, "CAUSAL_CONV1D_UPDATE_TPU_BLOCK", 8)):
            got = jax.jit(lambda *a, step=getattr(module, name): step(*a, impl="pallas"))(*args)
        assert calls == [1], name
        _check_step(got, want, state, jnp.float32)


def test_tpu_steps_reject_bad_input():
    ones = jnp.ones
    with pytest.raises(ValueError, match="multiple of the B/C groups"):  # 3 heads, 2 groups
        ssd_step_pallas_tpu(ones((1, 3, 4, 4)), ones((1, 3, 4)), ones((1, 3)), ones(3), ones((1, 2, 4)),
                            ones((1, 2, 4)), interpret=True)
    with pytest.raises(ValueError, match="B must have shape"):  # B: [Bt, N - 1]
        selective_state_update_pallas_tpu(ones((1, 8, 4)), ones((1, 8)), ones((1, 8)), ones((8, 4)), ones((1, 3)),
                                          ones((1, 4)), interpret=True)
    x, weight = jnp.ones((1, 4)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match="needs the conv state"):
        causal_conv1d_update_pallas_tpu(x, weight, interpret=True)
    with pytest.raises(ValueError, match="K >= 2"):
        causal_conv1d_update_pallas_tpu(x, jnp.ones((4, 1)), None, jnp.ones((1, 4, 0)), interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_steps_lower_to_mosaic(dtype):
    f32 = jnp.float32
    # Mamba-2 2.7B-like: 80 heads of 64 channels, N = 128, one group; D given.
    batch, heads, head_dim, n = 8, 80, 64, 128
    assert_lowers_to_mosaic_tpu(lambda *a: ssd_step_pallas_tpu(*a), S((batch, heads, head_dim, n), dtype),
                                S((batch, heads, head_dim), dtype), S((batch, heads), f32), S((heads,), f32),
                                S((batch, 1, n), dtype), S((batch, 1, n), dtype), S((heads,), f32))
    # Mamba-1 2.8B-like: 5120 channels (several blocks), N = 16, with D and z.
    channels, n = 5120, 16
    assert_lowers_to_mosaic_tpu(lambda *a: selective_state_update_pallas_tpu(*a), S((batch, channels, n), f32),
                                S((batch, channels), dtype), S((batch, channels), dtype), S((channels, n), f32),
                                S((batch, n), dtype), S((batch, n), dtype), S((channels,), f32),
                                S((batch, channels), dtype))
    # Mamba-2's conv over x, B, C: 5120 + 2 * 128 channels, K = 4, with bias.
    channels = 5376
    assert_lowers_to_mosaic_tpu(lambda *a: causal_conv1d_update_pallas_tpu(*a), S((batch, channels), dtype),
                                S((channels, 4), dtype), S((channels,), dtype), S((batch, channels, 3), dtype))
