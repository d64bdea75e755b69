"""Pallas decode-step kernels for Mamba (selective state update) and Mamba-2 (SSD step), in interpret
mode, against their jnp references on hypothesis-drawn shapes and dtypes.

Interpret mode fills every output the kernel does not alias with NaN before the call
(`jax._src.pallas.primitives.uninitialized_value`), so an unwritten element fails the comparison; the
aliased state output is checked to be the new state, not the old one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.selective_scan import selective_state_update, selective_state_update_ref
from pallas_kernels.ssd import ssd_step, ssd_step_ref

# Tolerances per input dtype (the kernels compute in float32 and round outputs to the input dtype).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "kernel left elements unwritten (NaN) or produced non-finite values"
    np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), heads_per_group=st.integers(1, 3), groups=st.integers(1, 3),
       head_dim=st.sampled_from([1, 3, 8, 16]), n=st.sampled_from([1, 5, 8, 16]), dtype=DTYPES,
       use_d=st.booleans(), seed=st.integers(0, 2**16))
def test_ssd_step_kernel_matches_reference(batch, heads_per_group, groups, head_dim, n, dtype, use_d, seed):
    heads = heads_per_group * groups
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    state = _normal(k[0], (batch, heads, head_dim, n), jnp.float32)
    x = _normal(k[1], (batch, heads, head_dim), dtype)
    dt = jax.nn.softplus(jax.random.normal(k[2], (batch, heads)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[3], (heads,)))
    B, C = _normal(k[4], (batch, groups, n), dtype), _normal(k[5], (batch, groups, n), dtype)
    D = _normal(k[6], (heads,), jnp.float32) if use_d else None
    y, new = ssd_step(state, x, dt, A, B, C, D, impl="interpret")
    y_ref, new_ref = ssd_step_ref(state, x, dt, A, B, C, D)
    assert y.dtype == x.dtype and new.dtype == state.dtype and new.shape == state.shape
    _close(y, y_ref, dtype)
    _close(new, new_ref, dtype)
    assert not np.allclose(np.asarray(new), np.asarray(state))  # the aliased state really was rewritten


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), channels=st.sampled_from([1, 6, 24, 96, 130]), n=st.sampled_from([1, 4, 16]),
       dtype=DTYPES, use_d=st.booleans(), use_z=st.booleans(), seed=st.integers(0, 2**16))
def test_selective_state_update_kernel_matches_reference(batch, channels, n, dtype, use_d, use_z, seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    state = _normal(k[0], (batch, channels, n), jnp.float32)
    x = _normal(k[1], (batch, channels), dtype)
    dt = jax.nn.softplus(jax.random.normal(k[2], (batch, channels)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[3], (channels, n)))
    B, C = _normal(k[4], (batch, n), dtype), _normal(k[5], (batch, n), dtype)
    D = _normal(k[6], (channels,), jnp.float32) if use_d else None
    z = _normal(k[7], (batch, channels), dtype) if use_z else None
    y, new = selective_state_update(state, x, dt, A, B, C, D, z, impl="interpret")
    y_ref, new_ref = selective_state_update_ref(state, x, dt, A, B, C, D, z)
    assert y.dtype == x.dtype and new.dtype == state.dtype
    _close(y, y_ref, dtype)
    _close(new, new_ref, dtype)


def test_step_kernels_run_under_jit_and_freeze_on_zero_dt():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    state = jax.random.normal(k[0], (2, 4, 8, 16))
    x = jax.random.normal(k[1], (2, 4, 8))
    B = C = jax.random.normal(k[2], (2, 2, 16))
    A = -jnp.ones((4,))
    step = jax.jit(lambda s, dt: ssd_step(s, x, dt, A, B, C, impl="interpret"))
    _, new = step(state, jnp.zeros((2, 4)))
    np.testing.assert_array_equal(np.asarray(new), np.asarray(state))


def test_step_kernels_give_clear_errors():
    state = jnp.zeros((1, 4, 8, 16))
    with pytest.raises(ValueError, match="no compiled Pallas kernel for backend 'cpu'"):
        ssd_step(state, jnp.zeros((1, 4, 8)), jnp.zeros((1, 4)), jnp.zeros((4,)), jnp.zeros((1, 2, 16)),
                 jnp.zeros((1, 2, 16)), impl="pallas")
    with pytest.raises(ValueError, match=r"ssd: C must have shape \(1, 1, 2, 16\), got \(1, 1, 2, 8\)"):
        ssd_step(state, jnp.zeros((1, 4, 8)), jnp.zeros((1, 4)), jnp.zeros((4,)), jnp.zeros((1, 2, 16)),
                 jnp.zeros((1, 2, 8)), impl="interpret")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        selective_state_update(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4)), jnp.zeros((1, 4)), jnp.zeros((4, 2)),
                               jnp.zeros((1, 2)), jnp.zeros((1, 2)), impl="cuda")


def test_step_kernels_lower_to_triton_for_gpu():
    from kernel_checks import assert_lowers_to_triton

    from pallas_kernels.selective_scan import selective_state_update_pallas
    from pallas_kernels.ssd import ssd_step_pallas

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    assert_lowers_to_triton(ssd_step_pallas, f32(2, 4, 64, 128), f32(2, 4, 64), f32(2, 4), f32(4), f32(2, 2, 128),
                            f32(2, 2, 128), f32(4))
    assert_lowers_to_triton(selective_state_update_pallas, f32(2, 96, 16), f32(2, 96), f32(2, 96), f32(96, 16),
                            f32(2, 16), f32(2, 16), f32(96), f32(2, 96))
