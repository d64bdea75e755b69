"""Causal conv1d references against a naive sequential loop in float64, on hypothesis-drawn shapes with a
state and ragged counts; the decode step against the prefill reference; clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref


def naive_conv(x, w, b, state, counts):
    """x: [B, T, C]; w: [C, K]; state: [B, C, K-1]. Loops in float64, SiLU after the bias."""
    x, w, state = (np.asarray(a, np.float64) for a in (x, w, state))
    batch, steps, _ = x.shape
    taps = w.shape[1]
    y = np.zeros_like(x)
    final = np.zeros_like(state)
    for i in range(batch):
        history = list(state[i].T) + list(x[i])  # inputs, oldest first
        for t in range(steps):
            window = np.stack(history[t : t + taps])  # [K, C]
            pre = (window * w.T).sum(0) + b
            y[i, t] = pre / (1 + np.exp(-pre))
        final[i] = np.stack(history[counts[i] : counts[i] + taps - 1]).T
    return y, final


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.integers(1, 20),
    channels=st.integers(1, 9),
    taps=st.integers(2, 5),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_causal_conv1d_matches_naive_with_state_and_ragged_counts(batch, steps, channels, taps, seed, data):
    rng = np.random.default_rng(seed)
    x, w, b, state = (
        rand(rng, batch, steps, channels),
        rand(rng, channels, taps),
        rand(rng, channels),
        rand(rng, batch, channels, taps - 1),
    )
    counts = np.array([data.draw(st.integers(0, steps)) for _ in range(batch)])
    y, final = causal_conv1d_ref(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.asarray(state), jnp.asarray(counts)
    )
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


def test_bad_shapes_and_options_raise_clear_errors():
    x = jnp.zeros((1, 4, 6))
    with pytest.raises(ValueError, match=r"x has 6 channels but weight is \[C=5, K=4\]"):
        causal_conv1d_ref(x, jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        causal_conv1d_ref(x, jnp.zeros((6, 4)), activation="relu")
