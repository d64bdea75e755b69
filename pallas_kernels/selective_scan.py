"""Mamba-1 selective scan (prefill) and its single-step state update (decode).

Per channel d and state index n, with a discretised time step dt_t (already softplus'ed):
    h_t = exp(dt_t[d] * A[d, n]) * h_{t-1} + dt_t[d] * B_t[n] * x_t[d]
    y_t[d] = sum_n C_t[n] * h_t[d, n] + D[d] * x_t[d],   then y_t *= silu(z_t) if z is given.
A step with dt = 0 leaves the state unchanged, which is how right-padded steps are masked.

The reference splits time into chunks: a `lax.scan` over chunks carries the state, and inside a
chunk a `lax.associative_scan` computes all its states at once. Memory is O(chunk * D * N), not
O(T * D * N), and the sequential depth is T / chunk.

The Pallas scan walks time step by step instead (the Mamba CUDA kernel's idea), with each program's
[channels, N] state on chip, loading its inputs a chunk of steps at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.gpu_params import (SELECTIVE_SCAN_BLOCK, SELECTIVE_SCAN_CHUNK, SELECTIVE_STATE_UPDATE_BLOCK,
                                       compiler_params, is_power_of_two)
from pallas_kernels.tpu_params import (SELECTIVE_SCAN_TPU_BLOCK, SELECTIVE_SCAN_TPU_CHUNK,
                                       SELECTIVE_STATE_UPDATE_TPU_BLOCK, tpu_compiler_params, tpu_interpret,
                                       tpu_row_block)

SCAN_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
UPDATE_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
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


def _scan_kernel(*refs, steps: int, channels: int, n: int, chunk: int, has_d: bool, has_z: bool,
                 has_state: bool):
    """One (sequence, channel block) program. Blocks: x, dt, z, y [T, BD]; B, C [T, N]; A, state, final
    state [BD, N]; D [BD]. Values are padded to powers of two by masked loads ([BT, BD] time chunks,
    [BT, Np] and [BD, Np] with Np >= N): padded steps load dt = 0, so the state does not move; padded
    channels and state indices load zeros; stores are masked."""
    x_ref, dt_ref, A_ref, B_ref, C_ref, *optional, y_ref, final_ref = refs
    optional = iter(optional)
    D_ref, z_ref, state_ref = (next(optional) if present else None for present in (has_d, has_z, has_state))
    f32 = jnp.float32
    block, n_pad = x_ref.shape[1], pl.next_power_of_2(n)
    states = pl.ds(0, n_pad)
    channel_ok = pl.program_id(1) * block + jnp.arange(block) < channels  # [BD]
    n_ok = jnp.arange(n_pad) < n  # [Np]
    state_ok = channel_ok[:, None] & n_ok[None, :]
    A = plgpu.load(A_ref.at[:, states], mask=state_ok, other=0.0).astype(f32)
    h = (plgpu.load(state_ref.at[:, states], mask=state_ok, other=0.0).astype(f32) if has_state
         else jnp.zeros((block, n_pad), f32))
    D = plgpu.load(D_ref, mask=channel_ok, other=0.0).astype(f32) if has_d else None
    rows = jnp.arange(chunk)

    def one_chunk(k, h):
        t0 = pl.multiple_of(k * chunk, chunk)
        times = pl.ds(t0, chunk)
        time_ok = (t0 + rows < steps)[:, None]  # [BT, 1]

        def tile(ref, cols=slice(None), cols_ok=channel_ok):  # [BT, BD], or [BT, Np] for B and C
            return plgpu.load(ref.at[times, cols], mask=time_ok & cols_ok[None, :], other=0.0).astype(f32)

        x, dt, B, C = tile(x_ref), tile(dt_ref), tile(B_ref, states, n_ok), tile(C_ref, states, n_ok)
        dtx = dt * x

        def one_step(i, carry):
            h, y = carry
            # Triton cannot index a register tensor dynamically: pick step i's row with a one-hot sum.
            here = rows[:, None] == i  # [BT, 1]
            row = lambda a: jnp.sum(jnp.where(here, a, 0.0), axis=0)  # noqa: E731
            h = h * jnp.exp(row(dt)[:, None] * A) + row(dtx)[:, None] * row(B)[None, :]
            y_i = jnp.sum(h * row(C)[None, :], axis=1)  # [BD]
            return h, jnp.where(here, y_i[None, :], y)

        h, y = jax.lax.fori_loop(0, chunk, one_step, (h, jnp.zeros((chunk, block), f32)))
        if has_d:
            y = y + x * D[None, :]
        if has_z:
            z = tile(z_ref)
            y = y * z * jax.nn.sigmoid(z)
        plgpu.store(y_ref.at[times, :], y.astype(y_ref.dtype), mask=time_ok & channel_ok[None, :])
        return h

    h = jax.lax.fori_loop(0, pl.cdiv(steps, chunk), one_chunk, h)
    plgpu.store(final_ref.at[:, states], h, mask=state_ok)


def selective_scan_pallas(x, dt, A, B, C, D=None, z=None, state=None, *, interpret: bool = False):
    """Pallas version of `selective_scan_ref` (same contract; any sizes). Grid (sequence, block of
    SELECTIVE_SCAN_BLOCK channels): each program keeps its [block, N] state on chip and walks time,
    loading x/dt/z and B/C SELECTIVE_SCAN_CHUNK steps at a time and storing y a chunk at a time."""
    _check(x, dt, A, B, C, D, z, state)
    batch, steps, channels = x.shape
    n = A.shape[-1]
    if steps == 0:  # nothing to launch
        return selective_scan_ref(x, dt, A, B, C, D, z, state)
    block = min(SELECTIVE_SCAN_BLOCK, pl.next_power_of_2(channels))
    chunk = min(SELECTIVE_SCAN_CHUNK, pl.next_power_of_2(steps))
    per_time = pl.BlockSpec((None, steps, block), lambda b, c: (b, 0, c))
    per_step = pl.BlockSpec((None, steps, n), lambda b, c: (b, 0, 0))
    per_state = pl.BlockSpec((None, block, n), lambda b, c: (b, c, 0))
    optional = [(D, pl.BlockSpec((block,), lambda b, c: (c,))), (z, per_time), (state, per_state)]
    optional = [(a, spec) for a, spec in optional if a is not None]
    kernel = functools.partial(_scan_kernel, steps=steps, channels=channels, n=n, chunk=chunk,
                               has_d=D is not None, has_z=z is not None, has_state=state is not None)
    return pl.pallas_call(
        kernel,
        grid=(batch, pl.cdiv(channels, block)),
        in_specs=[per_time, per_time, pl.BlockSpec((block, n), lambda b, c: (c, 0)), per_step, per_step,
                  *(spec for _, spec in optional)],
        out_specs=[per_time, per_state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, channels, n), jnp.float32)],
        compiler_params=compiler_params("selective_scan", interpret),
        interpret=interpret,
        name="selective_scan",
    )(x, dt, A, B, C, *(a for a, _ in optional))


def _scan_tpu_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, steps: int, has_d: bool, has_z: bool,
                     has_state: bool):
    """One (sequence, channel block, time chunk) step. Blocks: x, dt, z, y [TC, BD]; B, C [N, TC]
    (transposed); A, state, final state [N, BD] (transposed); D [1, BD]. Scratch: h [N, BD], the running
    state, and dt, dt * x, y [TC, BD] in float32 (read and written a row per step)."""
    refs = list(refs)
    D_ref = refs.pop(0) if has_d else None
    z_ref = refs.pop(0) if has_z else None
    state_ref = refs.pop(0) if has_state else None
    y_ref, final_ref, h_ref, dt_s, dtx_s, y_s = refs
    f32 = jnp.float32
    k = pl.program_id(2)
    chunk = x_ref.shape[0]

    @pl.when(k == 0)
    def _init():
        h_ref[...] = state_ref[...] if has_state else jnp.zeros(h_ref.shape, f32)

    x, dt = x_ref[...].astype(f32), dt_ref[...].astype(f32)
    dt_s[...] = dt
    dtx_s[...] = dt * x
    A, B, C = A_ref[...].astype(f32), B_ref[...].astype(f32), C_ref[...].astype(f32)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)

    def one_step(i, h):
        # Step i's B and C as [N, 1] columns: a one-hot lane sum (no dynamic lane indexing on TPU).
        here = lanes == i
        b = jnp.sum(jnp.where(here, B, 0.0), axis=1, keepdims=True)
        c = jnp.sum(jnp.where(here, C, 0.0), axis=1, keepdims=True)
        h = h * jnp.exp(dt_s[pl.ds(i, 1), :] * A) + b * dtx_s[pl.ds(i, 1), :]
        y_s[pl.ds(i, 1), :] = jnp.sum(h * c, axis=0, keepdims=True)
        return h

    # A partial last chunk stops at T: its rows past T (garbage) never touch the state, and their y is dropped.
    h_ref[...] = jax.lax.fori_loop(0, jnp.minimum(chunk, steps - k * chunk), one_step, h_ref[...])
    y = y_s[...]
    if has_d:
        y = y + x * D_ref[...].astype(f32)
    if has_z:
        z = z_ref[...].astype(f32)
        y = y * z * jax.nn.sigmoid(z)
    y_ref[...] = y.astype(y_ref.dtype)

    @pl.when(k == pl.num_programs(2) - 1)
    def _finish():
        final_ref[...] = h_ref[...]


def selective_scan_pallas_tpu(x, dt, A, B, C, D=None, z=None, state=None, *, interpret: bool = False):
    """Mosaic TPU version of `selective_scan_ref` (same contract, any sizes). Grid (sequence, block of BD
    channels, chunk of TC steps), the time axis sequential with the [N, BD] float32 state in VMEM scratch;
    each chunk walks its steps one at a time. Channels sit on lanes: BD is all of Dm up to
    SELECTIVE_SCAN_TPU_BLOCK, else that many (a multiple of 128; a partial last block is harmless, channels
    being independent); TC is all of T up to SELECTIVE_SCAN_TPU_CHUNK (a multiple of 128), else that many
    with a partial last chunk that stops at T, so x, dt, z and y are never padded or copied. Only the small
    arrays are transposed to put channels (A, state) or time (B, C) on lanes."""
    _check(x, dt, A, B, C, D, z, state)
    batch, steps, channels = x.shape
    n = A.shape[-1]
    if steps == 0:  # nothing to launch
        return selective_scan_ref(x, dt, A, B, C, D, z, state)
    block, chunk = min(channels, SELECTIVE_SCAN_TPU_BLOCK), min(steps, SELECTIVE_SCAN_TPU_CHUNK)
    per_time = pl.BlockSpec((None, chunk, block), lambda b, c, k: (b, k, c))
    per_step = pl.BlockSpec((None, n, chunk), lambda b, c, k: (b, 0, k))
    per_state = pl.BlockSpec((None, n, block), lambda b, c, k: (b, 0, c))
    in_specs = [per_time, per_time, pl.BlockSpec((n, block), lambda b, c, k: (0, c)), per_step, per_step]
    args = [x, dt, A.T, B.swapaxes(1, 2), C.swapaxes(1, 2)]
    for arg, spec in ((None if D is None else D[None, :], pl.BlockSpec((1, block), lambda b, c, k: (0, c))),
                      (z, per_time), (None if state is None else state.astype(jnp.float32).swapaxes(1, 2), per_state)):
        if arg is not None:
            in_specs.append(spec)
            args.append(arg)
    y, final = pl.pallas_call(
        functools.partial(_scan_tpu_kernel, steps=steps, has_d=D is not None, has_z=z is not None,
                          has_state=state is not None),
        grid=(batch, pl.cdiv(channels, block), pl.cdiv(steps, chunk)),
        in_specs=in_specs,
        out_specs=[per_time, per_state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, n, channels), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((n, block), jnp.float32)] + [pltpu.VMEM((chunk, block), jnp.float32)] * 3,
        compiler_params=tpu_compiler_params("selective_scan", interpret),
        interpret=tpu_interpret(interpret),
        name="selective_scan_tpu",
    )(*args)
    return y, final.swapaxes(1, 2)


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


def _state_update_tpu_kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, has_d: bool, has_z: bool):
    """One (sequence, channel block) program: state, A [BD, N]; x, dt, D, z, y [BD, 1] columns; B, C [1, N]."""
    refs = list(refs)
    D_ref = refs.pop(0) if has_d else None
    z_ref = refs.pop(0) if has_z else None
    y_ref, new_state_ref = refs
    f32 = jnp.float32
    dt, x = dt_ref[...].astype(f32), x_ref[...].astype(f32)
    h = state_ref[...].astype(f32) * jnp.exp(dt * A_ref[...].astype(f32)) + (dt * x) * B_ref[...].astype(f32)
    y = jnp.sum(h * C_ref[...].astype(f32), axis=1, keepdims=True)
    if has_d:
        y = y + D_ref[...].astype(f32) * x
    if has_z:
        z = z_ref[...].astype(f32)
        y = y * z * jax.nn.sigmoid(z)
    y_ref[...] = y.astype(y_ref.dtype)
    new_state_ref[...] = h.astype(new_state_ref.dtype)


def selective_state_update_pallas_tpu(state, x, dt, A, B, C, D=None, z=None, *, interpret: bool = False):
    """Mosaic TPU version of `selective_state_update_ref` (same contract, any sizes): grid (sequence, block
    of BD channels), BD from `tpu_row_block` (all channels up to SELECTIVE_STATE_UPDATE_TPU_BLOCK, else a
    sublane-tile multiple dividing Dm). Blocks span the full N; the per-channel vectors are viewed as
    [.., Dm, 1] columns (free reshapes), so nothing is padded. The state is updated in place."""
    _check(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None], state)
    batch, channels, n = state.shape
    dtypes = [a.dtype for a in (state, x, dt, A, D, z) if a is not None]  # all blocked along channels
    block = tpu_row_block(channels, SELECTIVE_STATE_UPDATE_TPU_BLOCK, *dtypes)
    column = pl.BlockSpec((None, block, 1), lambda b, c: (b, c, 0))
    rows_state = pl.BlockSpec((None, block, n), lambda b, c: (b, c, 0))
    per_sequence = pl.BlockSpec((None, 1, n), lambda b, c: (b, 0, 0))
    in_specs = [rows_state, column, column, pl.BlockSpec((block, n), lambda b, c: (c, 0)), per_sequence, per_sequence]
    args = [state, x[..., None], dt[..., None], A, B[:, None], C[:, None]]
    if D is not None:
        in_specs.append(pl.BlockSpec((block, 1), lambda b, c: (c, 0)))
        args.append(D[:, None])
    if z is not None:
        in_specs.append(column)
        args.append(z[..., None])
    y, new_state = pl.pallas_call(
        functools.partial(_state_update_tpu_kernel, has_d=D is not None, has_z=z is not None),
        grid=(batch, channels // block),
        in_specs=in_specs,
        out_specs=[column, rows_state],
        out_shape=[jax.ShapeDtypeStruct((*x.shape, 1), x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=tpu_compiler_params("selective_state_update", interpret),
        interpret=tpu_interpret(interpret),
        name="selective_state_update",
    )(*args)
    return y[..., 0], new_state


def selective_scan(x, dt, A, B, C, D=None, z=None, state=None, *, impl="auto"):
    """Dispatcher for `selective_scan_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    On TPU "pallas" runs `selective_scan_pallas_tpu`. Both Pallas kernels take every size, so there is no
    fallback by shape."""
    kind = resolve_impl(impl, "selective_scan", SCAN_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return selective_scan_pallas_tpu(x, dt, A, B, C, D, z, state)
    if kind == "xla":
        return selective_scan_ref(x, dt, A, B, C, D, z, state)
    return selective_scan_pallas(x, dt, A, B, C, D, z, state, interpret=kind == "interpret")


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, *, impl="auto"):
    """Dispatcher for `selective_state_update_ref`'s contract (see there). On TPU "pallas" runs
    `selective_state_update_pallas_tpu` (any sizes). The compiled GPU (Triton) kernel needs a power-of-two
    state_size: otherwise "auto" falls back to the reference and "pallas" raises."""
    kind = resolve_impl(impl, "selective_state_update", UPDATE_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return selective_state_update_pallas_tpu(state, x, dt, A, B, C, D, z)
    if kind == "pallas" and not is_power_of_two(state.shape[2]):
        if impl != "auto":
            raise ValueError(f"selective_state_update: the Pallas GPU kernel needs a power-of-two state_size, "
                             f"got {state.shape[2]}; use impl='xla'")
        kind = "xla"
    if kind == "xla":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z)
    return selective_state_update_pallas(state, x, dt, A, B, C, D, z, interpret=kind == "interpret")
