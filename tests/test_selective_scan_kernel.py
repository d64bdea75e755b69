"""Pallas Mamba-1 selective scan (prefill) in interpret mode against `selective_scan_ref` on
hypothesis-drawn shapes and dtypes, plus its Triton lowering for CUDA on realistic shapes.

Sizes cover lengths that are not multiples of the time chunk (and length 1), channel counts that are
not multiples of the channel block, and state sizes that are not powers of two: all of them go through
the kernel's masked loads and stores. Interpret mode fills unwritten outputs with NaN, which
`assert_close` rejects. Inputs come from numpy (jax.random would compile for every drawn shape) and
both implementations are jitted, to keep the file fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close, assert_lowers_to_triton

from pallas_kernels.gpu_params import SELECTIVE_SCAN_BLOCK, SELECTIVE_SCAN_CHUNK
from pallas_kernels.selective_scan import selective_scan, selective_scan_pallas, selective_scan_ref


scan_kernel = jax.jit(functools.partial(selective_scan, impl="interpret"))
scan_ref = jax.jit(selective_scan_ref)


def _inputs(seed, batch, steps, channels, n, dtype, use_d=True, use_z=True, use_state=True):
    rng = np.random.default_rng(seed)
    normal = lambda *shape, dt=dtype: jnp.asarray(rng.standard_normal(shape, np.float32), dt)  # noqa: E731
    return dict(
        x=normal(batch, steps, channels),
        dt=jnp.asarray(np.log1p(np.exp(rng.standard_normal((batch, steps, channels)) - 1.0)), dtype),  # softplus
        A=-jnp.exp(normal(channels, n, dt=jnp.float32)),
        B=normal(batch, steps, n),
        C=normal(batch, steps, n),
        D=normal(channels, dt=jnp.float32) if use_d else None,
        z=normal(batch, steps, channels) if use_z else None,
        state=normal(batch, channels, n, dt=jnp.float32) if use_state else None,
    )


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 2), steps=st.integers(1, 70), channels=st.sampled_from([1, 5, 32, 45, 70]),
       n=st.sampled_from([1, 4, 16]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), use_d=st.booleans(),
       use_z=st.booleans(), use_state=st.booleans(), seed=st.integers(0, 2**16))
@example(batch=1, steps=1, channels=5, n=4, dtype=jnp.float32, use_d=True, use_z=True, use_state=True, seed=0)
@example(batch=2, steps=SELECTIVE_SCAN_CHUNK + 3, channels=SELECTIVE_SCAN_BLOCK + 13, n=16, dtype=jnp.bfloat16,
         use_d=False, use_z=True, use_state=False, seed=1)
def test_selective_scan_kernel_matches_reference(batch, steps, channels, n, dtype, use_d, use_z, use_state, seed):
    inputs = _inputs(seed, batch, steps, channels, n, dtype, use_d, use_z, use_state)
    y, h = scan_kernel(**inputs)
    y_ref, h_ref = scan_ref(**inputs)
    assert y.dtype == inputs["x"].dtype and h.dtype == jnp.float32 and h.shape == (batch, channels, n)
    assert_close(y, y_ref, dtype)
    assert_close(h, h_ref, jnp.float32)  # the state is float32 whatever the input dtype


def test_zero_dt_steps_freeze_the_state():
    """A sequence whose steps all have dt = 0 (as right padding has) ends exactly in its initial state,
    across several time chunks and channel blocks; the other sequence moves."""
    inputs = _inputs(3, 2, 2 * SELECTIVE_SCAN_CHUNK + 5, SELECTIVE_SCAN_BLOCK + 5, 5, jnp.float32)
    inputs["dt"] = inputs["dt"].at[1].set(0.0)
    _, h = scan_kernel(**inputs)
    np.testing.assert_array_equal(np.asarray(h[1]), np.asarray(inputs["state"][1]))
    assert not np.allclose(np.asarray(h[0]), np.asarray(inputs["state"][0]))


def test_empty_sequence_returns_the_state():
    inputs = _inputs(0, 1, 0, 6, 3, jnp.float32)
    y, h = selective_scan_pallas(**inputs, interpret=True)
    assert y.shape == (1, 0, 6)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(inputs["state"]))


def test_selective_scan_gives_clear_errors():
    inputs = _inputs(0, 1, 4, 6, 3, jnp.float32)
    with pytest.raises(ValueError, match="selective_scan: no compiled Pallas kernel for backend 'cpu'"):
        selective_scan(**inputs, impl="pallas")
    with pytest.raises(ValueError, match="selective_scan: unknown impl 'triton'"):
        selective_scan(**inputs, impl="triton")
    with pytest.raises(ValueError, match=r"selective_scan: C must have shape \(1, 4, 3\), got \(1, 4, 2\)"):
        selective_scan_pallas(**{**inputs, "C": jnp.zeros((1, 4, 2))}, interpret=True)
    with pytest.raises(ValueError, match=r"selective_scan: state must have shape \(1, 6, 3\), got \(6, 3\)"):
        selective_scan(**{**inputs, "state": jnp.zeros((6, 3))}, impl="interpret")


def test_selective_scan_lowers_to_triton_for_gpu():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    # Mamba-130m prefill: Bt=1, T=2048, Dm=1536, N=16, with and without D / z / state.
    seq, A, BC = f32(1, 2048, 1536), f32(1536, 16), f32(1, 2048, 16)
    assert_lowers_to_triton(selective_scan_pallas, seq, seq, A, BC, BC, f32(1536), seq, f32(1, 1536, 16))
    assert_lowers_to_triton(selective_scan_pallas, seq, seq, A, BC, BC)
    # bfloat16 activations and sizes that need masking everywhere (T, Dm, N not powers of two).
    seq, BC = bf16(2, 333, 1000), bf16(2, 333, 5)
    assert_lowers_to_triton(selective_scan_pallas, seq, f32(2, 333, 1000), f32(1000, 5), BC, BC, bf16(1000), seq,
                            f32(2, 1000, 5))
