"""Mamba-1 selective scan (prefill) and its single-step state update (decode).

Per channel d and state index n, with a discretised time step dt_t (already softplus'ed):
    h_t = exp(dt_t[d] * A[d, n]) * h_{t-1} + dt_t[d] * B_t[n] * x_t[d]
    y_t[d] = sum_n C_t[n] * h_t[d, n] + D[d] * x_t[d],   then y_t *= silu(z_t) if z is given.
A step with dt = 0 leaves the state unchanged, which is how right-padded steps are masked.

The reference splits time into chunks: a `lax.scan` over chunks carries the state, and inside a
chunk a `lax.associative_scan` computes all its states at once. Memory is O(chunk * D * N), not
O(T * D * N), and the sequential depth is T / chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.gpu_params import SELECTIVE_STATE_UPDATE_BLOCK, compiler_params, is_power_of_two

SCAN_PALLAS_BACKENDS: tuple[str, ...] = ()
UPDATE_PALLAS_BACKENDS: tuple[str, ...] = ("gpu",)
DEFAULT_CHUNK = 32


def _combine(left, right):
    decay_l, value_l = left
    decay_r, value_r = right
    return decay_l * decay_r, decay_r * value_l + value_r


def _check(x, dt, A, B, C, D, z, state):
    batch, steps, channels = x.shape
    n = A.shape[-1]
    expected = {"dt": (dt.shape, x.shape), "A": (A.shape, (channels, n)), "B": (B.shape, (batch, steps, n)),
                "C": (C.shape, (batch, steps, n))}
    if D is not None:
        expected["D"] = (D.shape, (channels,))
    if z is not None:
        expected["z"] = (z.shape, x.shape)
    if state is not None:
        expected["state"] = (state.shape, (batch, channels, n))
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"selective_scan: {name} must have shape {want}, got {tuple(got)}")


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
    _check(x, dt, A, B, C, D, z, state)
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
    _check(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None], state)
    dt32, x32 = dt.astype(jnp.float32), x.astype(jnp.float32)
    decay = jnp.exp(dt32[..., None] * A.astype(jnp.float32))
    h = state.astype(jnp.float32) * decay + (dt32 * x32)[..., None] * B.astype(jnp.float32)[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h, C.astype(jnp.float32))
    return _gate(y, x32, D, z).astype(x.dtype), h.astype(state.dtype)


def _state_update_kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, z_ref, y_ref, new_state_ref,
                         *, gate: bool):
    """One (sequence, channel block) program: state [BD, N], x/dt/D/z [BD], A [BD, N], B/C [N]."""
    f32 = jnp.float32
    dt, x = dt_ref[...].astype(f32), x_ref[...].astype(f32)
    h = state_ref[...].astype(f32) * jnp.exp(dt[:, None] * A_ref[...].astype(f32)) \
        + (dt * x)[:, None] * B_ref[...].astype(f32)[None, :]
    y = jnp.sum(h * C_ref[...].astype(f32)[None, :], axis=1) + D_ref[...].astype(f32) * x
    if gate:
        z = z_ref[...].astype(f32)
        y = y * z * jax.nn.sigmoid(z)
    y_ref[...] = y.astype(y_ref.dtype)
    new_state_ref[...] = h.astype(new_state_ref.dtype)


def _channel_block(channels: int) -> int:
    """The largest power of two <= SELECTIVE_STATE_UPDATE_BLOCK dividing `channels`."""
    block = SELECTIVE_STATE_UPDATE_BLOCK
    while channels % block:
        block //= 2
    return block


def selective_state_update_pallas(state, x, dt, A, B, C, D=None, z=None, *, interpret: bool = False):
    """Pallas version of `selective_state_update_ref` (same contract): one program per (sequence,
    block of channels) with its [block, N] state on chip, updated in place (aliased buffer)."""
    _check(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None], state)
    batch, channels, n = state.shape
    block = _channel_block(channels)
    D = jnp.zeros((channels,), jnp.float32) if D is None else D
    rows = pl.BlockSpec((None, block), lambda b, c: (b, c))
    rows_state = pl.BlockSpec((None, block, n), lambda b, c: (b, c, 0))
    per_sequence = pl.BlockSpec((None, n), lambda b, c: (b, 0))
    return pl.pallas_call(
        functools.partial(_state_update_kernel, gate=z is not None),
        grid=(batch, channels // block),
        in_specs=[rows_state, rows, rows, pl.BlockSpec((block, n), lambda b, c: (c, 0)), per_sequence,
                  per_sequence, pl.BlockSpec((block,), lambda b, c: (c,)), rows],
        out_specs=[rows, rows_state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=compiler_params("selective_state_update", interpret),
        interpret=interpret,
        name="selective_state_update",
    )(state, x, dt, A, B, C, D, x if z is None else z)


def selective_scan(x, dt, A, B, C, D=None, z=None, state=None, *, impl="auto"):
    """Dispatcher for `selective_scan_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`."""
    resolve_impl(impl, "selective_scan", SCAN_PALLAS_BACKENDS)
    return selective_scan_ref(x, dt, A, B, C, D, z, state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, *, impl="auto"):
    """Dispatcher for `selective_state_update_ref`'s contract (see there). The compiled (Triton) kernel
    needs a power-of-two state_size: otherwise "auto" falls back to the reference and "pallas" raises."""
    kind = resolve_impl(impl, "selective_state_update", UPDATE_PALLAS_BACKENDS)
    if kind == "pallas" and not is_power_of_two(state.shape[2]):
        if impl != "auto":
            raise ValueError(f"selective_state_update: the Pallas GPU kernel needs a power-of-two state_size, "
                             f"got {state.shape[2]}; use impl='xla'")
        kind = "xla"
    if kind == "xla":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z)
    return selective_state_update_pallas(state, x, dt, A, B, C, D, z, interpret=kind == "interpret")
