"""SSM references (causal conv1d, Mamba-1 selective scan, Mamba-2 SSD) against naive sequential
recurrences in float64, on hypothesis-drawn shapes; decode steps against the prefill references."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from pallas_kernels.selective_scan import selective_scan_ref, selective_state_update_ref
from pallas_kernels.ssd import segsum, ssd_chunked_ref, ssd_step_ref


def silu(x):
    return x / (1 + np.exp(-x))


def naive_conv(x, w, b, state, counts):
    """x: [B, T, C]; w: [C, K]; state: [B, C, K-1]. Loops in float64."""
    x, w, state = (np.asarray(a, np.float64) for a in (x, w, state))
    batch, steps, _ = x.shape
    taps = w.shape[1]
    y = np.zeros_like(x)
    final = np.zeros_like(state)
    for i in range(batch):
        history = list(state[i].T) + list(x[i])  # inputs, oldest first
        for t in range(steps):
            window = np.stack(history[t : t + taps])  # [K, C]
            y[i, t] = silu((window * w.T).sum(0) + b)
        final[i] = np.stack(history[counts[i] : counts[i] + taps - 1]).T
    return y, final


def naive_selective_scan(x, dt, A, B, C, D, z, h0):
    x, dt, A, B, C, D, z, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, z, h0))
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + D * x[:, t]
    return y * silu(z), h


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


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), steps=st.integers(1, 20), channels=st.integers(1, 9), taps=st.integers(2, 5),
       seed=st.integers(0, 2**31), data=st.data())
def test_causal_conv1d_matches_naive_with_state_and_ragged_counts(batch, steps, channels, taps, seed, data):
    rng = np.random.default_rng(seed)
    x, w, b, state = rand(rng, batch, steps, channels), rand(rng, channels, taps), rand(rng, channels), \
        rand(rng, batch, channels, taps - 1)
    counts = np.array([data.draw(st.integers(0, steps)) for _ in range(batch)])
    y, final = causal_conv1d_ref(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.asarray(state),
                                 jnp.asarray(counts))
    y_ref, final_ref = naive_conv(x, w, b, state, counts)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final), final_ref, atol=0)


def test_conv_update_equals_conv_of_one_step():
    rng = np.random.default_rng(0)
    x, w, b, state = rand(rng, 2, 1, 6), rand(rng, 6, 4), rand(rng, 6), rand(rng, 2, 6, 3)
    y, new = causal_conv1d_update_ref(jnp.asarray(x[:, 0]), jnp.asarray(w), jnp.asarray(b), jnp.asarray(state))
    y_ref, new_ref = causal_conv1d_ref(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.asarray(state))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref[:, 0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(new_ref))


def mamba1_inputs(rng, batch, steps, channels, n):
    return dict(x=rand(rng, batch, steps, channels), dt=np.abs(rand(rng, batch, steps, channels, scale=0.5)),
                A=-np.exp(rand(rng, channels, n, scale=0.5)), B=rand(rng, batch, steps, n),
                C=rand(rng, batch, steps, n), D=rand(rng, channels), z=rand(rng, batch, steps, channels))


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 2), steps=st.integers(1, 40), channels=st.integers(1, 6), n=st.integers(1, 5),
       chunk=st.sampled_from([1, 3, 8, 32]), seed=st.integers(0, 2**31))
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
        y, h = selective_state_update_ref(h, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                                          inputs["C"][:, t], inputs["D"], inputs["z"][:, t])
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_all[:, t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_all), atol=1e-5)


def mamba2_inputs(rng, batch, steps, groups, rep, head_dim, n):
    heads = groups * rep
    return dict(x=rand(rng, batch, steps, heads, head_dim), dt=np.abs(rand(rng, batch, steps, heads, scale=0.5)),
                A=-np.exp(rand(rng, heads, scale=0.5)), B=rand(rng, batch, steps, groups, n),
                C=rand(rng, batch, steps, groups, n), D=rand(rng, heads))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), steps=st.integers(1, 40), groups=st.integers(1, 3), rep=st.integers(1, 3),
       head_dim=st.sampled_from([1, 4, 8]), n=st.integers(1, 6), chunk=st.sampled_from([1, 4, 7, 16, 64]),
       seed=st.integers(0, 2**31))
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
        y, h = ssd_step_ref(h, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                            inputs["C"][:, t], inputs["D"])
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_all[:, t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_all), atol=1e-5)


def test_segsum_is_the_sum_between_positions():
    a = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    out = np.asarray(segsum(jnp.asarray(a)))
    for l in range(4):
        for s in range(4):
            expected = a[s + 1 : l + 1].sum() if s <= l else -np.inf
            assert out[l, s] == pytest.approx(expected)


def test_bad_shapes_and_options_raise_clear_errors():
    x = jnp.zeros((1, 4, 6))
    with pytest.raises(ValueError, match=r"x has 6 channels but weight is \[C=5, K=4\]"):
        causal_conv1d_ref(x, jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        causal_conv1d_ref(x, jnp.zeros((6, 4)), activation="relu")
    with pytest.raises(ValueError, match=r"selective_scan: A must have shape \(6, 3\)"):
        selective_scan_ref(x, x, jnp.zeros((5, 3)), jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"heads \(3\) must be a multiple of the B/C groups \(2\)"):
        ssd_chunked_ref(jnp.zeros((1, 4, 3, 2)), jnp.zeros((1, 4, 3)), jnp.zeros(3), jnp.zeros((1, 4, 2, 5)),
                        jnp.zeros((1, 4, 2, 5)))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ssd_chunked_ref(jnp.zeros((1, 4, 2, 2)), jnp.zeros((1, 4, 2)), jnp.zeros(2), jnp.zeros((1, 4, 1, 5)),
                        jnp.zeros((1, 4, 1, 5)), chunk_size=0)
