"""Causal depthwise 1-D convolution (the short convolution of Mamba / Mamba-2 blocks), and its decode step.

Each channel c is convolved with its own K taps; the output at step t sees inputs t-K+1..t. The
previous K-1 inputs of a sequence are its "conv state" `[B, C, K-1]` (oldest first), so a prefill
can continue a cached sequence and a decode step needs only the state and one new input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import resolve_impl

PALLAS_BACKENDS: tuple[str, ...] = ()
ACTIVATIONS = (None, "silu")


def _check(x, weight, bias, state, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    channels, taps = weight.shape
    if x.shape[-1] != channels:
        raise ValueError(f"causal_conv1d: x has {x.shape[-1]} channels but weight is [C={channels}, K={taps}]")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"causal_conv1d: bias must be [{channels}], got {bias.shape}")
    if state is not None and state.shape != (x.shape[0], channels, taps - 1):
        raise ValueError(f"causal_conv1d: state must be [{x.shape[0]}, {channels}, {taps - 1}], got {state.shape}")


def _activate(y, bias, activation):
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return jax.nn.silu(y) if activation == "silu" else y


def causal_conv1d_ref(x, weight, bias=None, state=None, counts=None, activation="silu"):
    """Reference causal conv over a block of new steps.

    x: [B, T, C]; weight: [C, K]; bias: [C] or None; state: [B, C, K-1] inputs before x (None: zeros);
    counts: [B] real steps per row (right padding beyond; default T). Returns `(y [B, T, C] in x's
    dtype, new_state [B, C, K-1])`, the new state holding the last K-1 inputs up to step counts[b].
    """
    _check(x, weight, bias, state, activation)
    batch, steps, channels = x.shape
    taps = weight.shape[1]
    if state is None:
        state = jnp.zeros((batch, channels, taps - 1), x.dtype)
    padded = jnp.concatenate([state.transpose(0, 2, 1).astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    w = weight.astype(jnp.float32)
    y = sum(padded[:, k : k + steps].astype(jnp.float32) * w[:, k] for k in range(taps))
    y = _activate(y, bias, activation).astype(x.dtype)
    counts = jnp.full((batch,), steps, jnp.int32) if counts is None else counts.astype(jnp.int32)
    # x[t] sits at padded[t + K - 1]; the K-1 inputs ending at step counts-1 start at padded[counts].
    window = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, taps - 1, axis=0))(padded, counts)
    return y, window.transpose(0, 2, 1).astype(state.dtype)


def causal_conv1d_update_ref(x, weight, bias=None, state=None, activation="silu"):
    """One decode step. x: [B, C]; state: [B, C, K-1]. Returns `(y [B, C], new_state [B, C, K-1])`."""
    _check(x[:, None], weight, bias, state, activation)
    window = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)[:, :, None]], axis=-1)
    y = jnp.sum(window * weight.astype(jnp.float32), axis=-1)
    return _activate(y, bias, activation).astype(x.dtype), window[:, :, 1:].astype(state.dtype)


def causal_conv1d(x, weight, bias=None, state=None, counts=None, activation="silu", *, impl="auto"):
    """Dispatcher for `causal_conv1d_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`."""
    resolve_impl(impl, "causal_conv1d", PALLAS_BACKENDS)
    return causal_conv1d_ref(x, weight, bias, state, counts, activation)


def causal_conv1d_update(x, weight, bias=None, state=None, activation="silu", *, impl="auto"):
    """Dispatcher for `causal_conv1d_update_ref`'s contract (see there)."""
    resolve_impl(impl, "causal_conv1d_update", PALLAS_BACKENDS)
    return causal_conv1d_update_ref(x, weight, bias, state, activation)
