"""Mamba-2 SSD references: the chunked scan against a naive sequential recurrence in float64 on
hypothesis-drawn shapes and chunk sizes; the decode step against the chunked scan (and dt = 0 freezing
the state); segsum; clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.ssd import segsum, ssd_chunked_ref, ssd_step_ref


def naive_ssd(x, dt, A, B, C, D, h0):
    """x: [Bt, T, H, P]; dt: [Bt, T, H]; B, C: [Bt, T, G, N]; h0: [Bt, H, P, N]."""
    x, dt, A, B, C, D, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, h0))
    rep = x.shape[2] // B.shape[2]
    B, C = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, C[:, t]) + D[:, None] * x[:, t]
    return y, h


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def mamba2_inputs(rng, batch, steps, groups, rep, head_dim, n):
    heads = groups * rep
    return dict(
        x=rand(rng, batch, steps, heads, head_dim),
        dt=np.abs(rand(rng, batch, steps, heads, scale=0.5)),
        A=-np.exp(rand(rng, heads, scale=0.5)),
        B=rand(rng, batch, steps, groups, n),
        C=rand(rng, batch, steps, groups, n),
        D=rand(rng, heads),
    )


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 40),
    groups=st.integers(1, 3),
    rep=st.integers(1, 3),
    head_dim=st.sampled_from([1, 4, 8]),
    n=st.integers(1, 6),
    chunk=st.sampled_from([1, 4, 7, 16, 64]),
    seed=st.integers(0, 2**31),
)
def test_ssd_chunked_matches_naive_recurrence(batch, steps, groups, rep, head_dim, n, chunk, seed):
    rng = np.random.default_rng(seed)
    inputs = mamba2_inputs(rng, batch, steps, groups, rep, head_dim, n)
    h0 = rand(rng, batch, groups * rep, head_dim, n)
    y, h = ssd_chunked_ref(**{k: jnp.asarray(v) for k, v in inputs.items()}, state=jnp.asarray(h0), chunk_size=chunk)
    y_ref, h_ref = naive_ssd(**inputs, h0=h0)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(h), h_ref, atol=5e-5, rtol=1e-4)


def test_ssd_step_equals_chunked_steps_and_zero_dt_freezes_the_state():
    rng = np.random.default_rng(2)
    inputs = {k: jnp.asarray(v) for k, v in mamba2_inputs(rng, 2, 9, 2, 2, 4, 3).items()}
    inputs["dt"] = inputs["dt"].at[1, 5:].set(0.0)  # row 1: steps 5.. are padding
    y_all, h_all = ssd_chunked_ref(**inputs, chunk_size=4)
    _, h_first5 = ssd_chunked_ref(**{k: (v[1:, :5] if v.ndim > 1 else v) for k, v in inputs.items()}, chunk_size=4)
    np.testing.assert_allclose(np.asarray(h_all[1]), np.asarray(h_first5[0]), atol=1e-5)
    h = jnp.zeros((2, 4, 4, 3))
    for t in range(9):
        y, h = ssd_step_ref(
            h, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t], inputs["D"]
        )
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_all[:, t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_all), atol=1e-5)


def test_segsum_is_the_sum_between_positions():
    a = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    out = np.asarray(segsum(jnp.asarray(a)))
    for l in range(4):  # noqa: E741
        for s in range(4):
            expected = a[s + 1 : l + 1].sum() if s <= l else -np.inf
            assert out[l, s] == pytest.approx(expected)


def test_bad_shapes_and_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"heads \(3\) must be a multiple of the B/C groups \(2\)"):
        ssd_chunked_ref(
            jnp.zeros((1, 4, 3, 2)),
            jnp.zeros((1, 4, 3)),
            jnp.zeros(3),
            jnp.zeros((1, 4, 2, 5)),
            jnp.zeros((1, 4, 2, 5)),
        )
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ssd_chunked_ref(
            jnp.zeros((1, 4, 2, 2)),
            jnp.zeros((1, 4, 2)),
            jnp.zeros(2),
            jnp.zeros((1, 4, 1, 5)),
            jnp.zeros((1, 4, 1, 5)),
            chunk_size=0,
        )
