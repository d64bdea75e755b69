"""Causal conv1d references: a block of new steps and the single decode step; with the checks that the
kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu")


def check_inputs(x, weight, bias, state, activation):
    """The contract's shapes and options (see `causal_conv1d_ref`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    channels, taps = weight.shape
    if x.shape[-1] != channels:
        raise ValueError(f"causal_conv1d: x has {x.shape[-1]} channels but weight is [C={channels}, K={taps}]")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"causal_conv1d: bias must be [{channels}], got {bias.shape}")
    if state is not None and state.shape != (x.shape[0], channels, taps - 1):
        raise ValueError(f"causal_conv1d: state must be [{x.shape[0]}, {channels}, {taps - 1}], got {state.shape}")


def kernel_takes(taps: int, steps: int) -> bool:
    """The Pallas kernels (GPU and TPU) need K >= 2 taps and T >= 1 steps."""
    return taps >= 2 and steps >= 1


def check_kernel_inputs(x, weight, bias, state, activation):
    """`check_inputs`, and what the prefill kernels need."""
    check_inputs(x, weight, bias, state, activation)
    taps, steps = weight.shape[1], x.shape[1]
    if not kernel_takes(taps, steps):
        raise ValueError(
            f"causal_conv1d: the Pallas kernel needs K >= 2 taps and T >= 1 steps, got K={taps}, "
            f"T={steps}; use impl='xla'"
        )


def check_update_kernel_inputs(x, weight, bias, state, activation):
    """`check_inputs` of a decode step, and what the decode kernels need."""
    if state is None:
        raise ValueError("causal_conv1d_update: a decode step needs the conv state [B, C, K-1], got None")
    check_inputs(x[:, None], weight, bias, state, activation)
    taps = weight.shape[1]
    if not kernel_takes(taps, 1):
        raise ValueError(f"causal_conv1d_update: the Pallas kernel needs K >= 2 taps, got K={taps}; use impl='xla'")


def _activate(y, bias, activation):
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return jax.nn.silu(y) if activation == "silu" else y


def final_window(padded, counts, taps: int):
    """The new conv state [B, C, K-1] of `padded` [B, K-1+T, C] (the old state's K-1 inputs, then x):
    x[t] sits at padded[t + K - 1], so the K-1 inputs ending at step counts[b] - 1 start at padded[counts[b]]
    (a start clamped into [0, T], as `dynamic_slice` does)."""
    window = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, taps - 1, axis=0))(padded, counts)
    return window.transpose(0, 2, 1)


def causal_conv1d_ref(x, weight, bias=None, state=None, counts=None, activation="silu"):
    """Reference causal conv over a block of new steps.

    x: [B, T, C]; weight: [C, K]; bias: [C] or None; state: [B, C, K-1] inputs before x (None: zeros);
    counts: [B] real steps per row (right padding beyond; default T). Returns `(y [B, T, C] in x's
    dtype, new_state [B, C, K-1])`, the new state holding the last K-1 inputs up to step counts[b].
    """
    check_inputs(x, weight, bias, state, activation)
    batch, steps, channels = x.shape
    taps = weight.shape[1]
    if state is None:
        state = jnp.zeros((batch, channels, taps - 1), x.dtype)
    padded = jnp.concatenate([state.transpose(0, 2, 1).astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    w = weight.astype(jnp.float32)
    y = sum(padded[:, k : k + steps].astype(jnp.float32) * w[:, k] for k in range(taps))
    y = _activate(y, bias, activation).astype(x.dtype)
    counts = jnp.full((batch,), steps, jnp.int32) if counts is None else counts.astype(jnp.int32)
    return y, final_window(padded, counts, taps).astype(state.dtype)


def causal_conv1d_update_ref(x, weight, bias=None, state=None, activation="silu"):
    """One decode step. x: [B, C]; state: [B, C, K-1]. Returns `(y [B, C], new_state [B, C, K-1])`."""
    check_inputs(x[:, None], weight, bias, state, activation)
    window = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)[:, :, None]], axis=-1)
    y = jnp.sum(window * weight.astype(jnp.float32), axis=-1)
    return _activate(y, bias, activation).astype(x.dtype), window[:, :, 1:].astype(state.dtype)
