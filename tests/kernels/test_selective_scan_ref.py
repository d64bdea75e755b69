"""Mamba-1 references: the chunked selective scan against a naive sequential recurrence in float64 on
hypothesis-drawn shapes and chunk sizes; the decode step against the scan; clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.selective_scan import selective_scan_ref, selective_state_update_ref


def naive_selective_scan(x, dt, A, B, C, D, z, h0):
    x, dt, A, B, C, D, z, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, z, h0))
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + D * x[:, t]
    return y * z / (1 + np.exp(-z)), h


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def mamba1_inputs(rng, batch, steps, channels, n):
    return dict(
        x=rand(rng, batch, steps, channels),
        dt=np.abs(rand(rng, batch, steps, channels, scale=0.5)),
        A=-np.exp(rand(rng, channels, n, scale=0.5)),
        B=rand(rng, batch, steps, n),
        C=rand(rng, batch, steps, n),
        D=rand(rng, channels),
        z=rand(rng, batch, steps, channels),
    )


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 40),
    channels=st.integers(1, 6),
    n=st.integers(1, 5),
    chunk=st.sampled_from([1, 3, 8, 32]),
    seed=st.integers(0, 2**31),
)
def test_selective_scan_matches_naive_recurrence(batch, steps, channels, n, chunk, seed):
    rng = np.random.default_rng(seed)
    inputs = mamba1_inputs(rng, batch, steps, channels, n)
    h0 = rand(rng, batch, channels, n)
    y, h = selective_scan_ref(**{k: jnp.asarray(v) for k, v in inputs.items()}, state=jnp.asarray(h0), chunk=chunk)
    y_ref, h_ref = naive_selective_scan(**inputs, h0=h0)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(h), h_ref, atol=2e-5, rtol=1e-4)


def test_selective_state_update_equals_scan_steps():
    rng = np.random.default_rng(1)
    inputs = {k: jnp.asarray(v) for k, v in mamba1_inputs(rng, 2, 6, 5, 4).items()}
    y_all, h_all = selective_scan_ref(**inputs)
    h = jnp.zeros((2, 5, 4))
    for t in range(6):
        y, h = selective_state_update_ref(
            h,
            inputs["x"][:, t],
            inputs["dt"][:, t],
            inputs["A"],
            inputs["B"][:, t],
            inputs["C"][:, t],
            inputs["D"],
            inputs["z"][:, t],
        )
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_all[:, t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_all), atol=1e-5)


def test_bad_shapes_raise_clear_errors():
    x = jnp.zeros((1, 4, 6))
    with pytest.raises(ValueError, match=r"selective_scan: A must have shape \(6, 3\)"):
        selective_scan_ref(x, x, jnp.zeros((5, 3)), jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 3)))
