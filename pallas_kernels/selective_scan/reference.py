"""Mamba-1 references: the chunked selective scan and the single decode step; with the shape checks
that the kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 32


def _combine(left, right):
    decay_l, value_l = left
    decay_r, value_r = right
    return decay_l * decay_r, decay_r * value_l + value_r


def check_inputs(x, dt, A, B, C, D, z, state):
    """The contract's shapes (see `selective_scan_ref`); a ValueError naming the first bad one."""
    batch, steps, channels = x.shape
    n = A.shape[-1]
    expected = {
        "dt": (dt.shape, x.shape),
        "A": (A.shape, (channels, n)),
        "B": (B.shape, (batch, steps, n)),
        "C": (C.shape, (batch, steps, n)),
    }
    if D is not None:
        expected["D"] = (D.shape, (channels,))
    if z is not None:
        expected["z"] = (z.shape, x.shape)
    if state is not None:
        expected["state"] = (state.shape, (batch, channels, n))
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"selective_scan: {name} must have shape {want}, got {tuple(got)}")


def check_step_inputs(state, x, dt, A, B, C, D, z):
    """`check_inputs` for one decode step (see `selective_state_update_ref`)."""
    check_inputs(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None], state)


def _gate(y, x, D, z):
    if D is not None:
        y = y + x * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, state=None, chunk: int = DEFAULT_CHUNK):
    """x, dt: [Bt, T, Dm]; A: [Dm, N] (negative); B, C: [Bt, T, N]; D: [Dm]; z: [Bt, T, Dm];
    state: [Bt, Dm, N] before x (None: zeros). Returns `(y [Bt, T, Dm] in x's dtype, final state
    [Bt, Dm, N] float32)`. Computed in float32.
    """
    check_inputs(x, dt, A, B, C, D, z, state)
    batch, steps, channels = x.shape
    n = A.shape[-1]
    chunk = max(1, min(chunk, steps))
    pad = -steps % chunk
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    xs, dts, Bs, Cs = (jnp.pad(f32(a), ((0, 0), (0, pad), (0, 0))) for a in (x, dt, B, C))
    chunks = lambda a: a.reshape(batch, -1, chunk, a.shape[-1]).swapaxes(0, 1)  # noqa: E731
    h0 = jnp.zeros((batch, channels, n), jnp.float32) if state is None else f32(state)
    A32 = f32(A)

    def one_chunk(h, inputs):
        x_c, dt_c, B_c, C_c = inputs  # [Bt, L, Dm] / [Bt, L, N]
        decay = jnp.exp(dt_c[..., None] * A32)  # [Bt, L, Dm, N]
        value = (dt_c * x_c)[..., None] * B_c[:, :, None, :]
        value = value.at[:, 0].add(decay[:, 0] * h)  # fold the carried state into the first step
        _, states = jax.lax.associative_scan(_combine, (decay, value), axis=1)
        return states[:, -1], jnp.einsum("bldn,bln->bld", states, C_c)

    h, ys = jax.lax.scan(one_chunk, h0, (chunks(xs), chunks(dts), chunks(Bs), chunks(Cs)))
    y = ys.swapaxes(0, 1).reshape(batch, -1, channels)[:, :steps]
    return _gate(y, f32(x), D, z).astype(x.dtype), h


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None):
    """One decode step. state: [Bt, Dm, N]; x, dt, z: [Bt, Dm]; B, C: [Bt, N].
    Returns `(y [Bt, Dm] in x's dtype, new state [Bt, Dm, N] in state's dtype)`."""
    check_step_inputs(state, x, dt, A, B, C, D, z)
    dt32, x32 = dt.astype(jnp.float32), x.astype(jnp.float32)
    decay = jnp.exp(dt32[..., None] * A.astype(jnp.float32))
    h = state.astype(jnp.float32) * decay + (dt32 * x32)[..., None] * B.astype(jnp.float32)[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h, C.astype(jnp.float32))
    return _gate(y, x32, D, z).astype(x.dtype), h.astype(state.dtype)
