"""Mamba-1 kernels for Mosaic TPU: the selective scan and the state update."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.lowering import tpu_interpret, tpu_params, tpu_row_block
from pallas_kernels.selective_scan.reference import check_inputs, check_step_inputs, selective_scan_ref
from pallas_kernels.state_update import decode_step_tpu, state_update_tpu_kernel


@dataclasses.dataclass(frozen=True)
class SelectiveScanTPUBlockSizes(BlockSizes):
    """`selective_scan_pallas_tpu` (prefill): most channels (lanes) per program and steps per time chunk,
    both multiples of 128. VMEM per program: [chunk, block] x/dt/z/y blocks double-buffered plus three
    float32 [chunk, block] scratches, under 3 MiB in float32."""

    block_d: int = 512
    block_t: int = 128

    def __post_init__(self):
        super().__post_init__()
        self._multiples(128, "block_d", "block_t")


@dataclasses.dataclass(frozen=True)
class SelectiveStateUpdateTPUBlockSizes(BlockSizes):
    """Most channels per program of `selective_state_update_pallas_tpu` (VMEM stays small: a [512, N]
    float32 state block pads to 512 x 128 lanes, 256 KiB)."""

    block_d: int = 512


def _scan_tpu_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, steps: int, has_d: bool, has_z: bool, has_state: bool):
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


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def selective_scan_pallas_tpu(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    state=None,
    *,
    block_sizes: SelectiveScanTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU version of `selective_scan_ref` (same contract, any sizes). Grid (sequence, block of BD
    channels, chunk of TC steps), the time axis sequential with the [N, BD] float32 state in VMEM scratch;
    each chunk walks its steps one at a time. Channels sit on lanes: BD is all of Dm up to
    `block_sizes.block_d`, else that many (a partial last block is harmless, channels being independent);
    TC is all of T up to `block_sizes.block_t`, else that many with a partial last chunk that stops at T,
    so x, dt, z and y are never padded or copied. Only the small arrays are transposed to put channels
    (A, state) or time (B, C) on lanes."""
    check_inputs(x, dt, A, B, C, D, z, state)
    blocks = SelectiveScanTPUBlockSizes.resolve(block_sizes, "selective_scan")
    batch, steps, channels = x.shape
    n = A.shape[-1]
    if steps == 0:  # nothing to launch
        return selective_scan_ref(x, dt, A, B, C, D, z, state)
    block, chunk = min(channels, blocks.block_d), min(steps, blocks.block_t)
    per_time = pl.BlockSpec((None, chunk, block), lambda b, c, k: (b, k, c))
    per_step = pl.BlockSpec((None, n, chunk), lambda b, c, k: (b, 0, k))
    per_state = pl.BlockSpec((None, n, block), lambda b, c, k: (b, 0, c))
    in_specs = [per_time, per_time, pl.BlockSpec((n, block), lambda b, c, k: (0, c)), per_step, per_step]
    args = [x, dt, A.T, B.swapaxes(1, 2), C.swapaxes(1, 2)]
    for arg, spec in (
        (None if D is None else D[None, :], pl.BlockSpec((1, block), lambda b, c, k: (0, c))),
        (z, per_time),
        (None if state is None else state.astype(jnp.float32).swapaxes(1, 2), per_state),
    ):
        if arg is not None:
            in_specs.append(spec)
            args.append(arg)
    y, final = pl.pallas_call(
        functools.partial(
            _scan_tpu_kernel, steps=steps, has_d=D is not None, has_z=z is not None, has_state=state is not None
        ),
        grid=(batch, pl.cdiv(channels, block), pl.cdiv(steps, chunk)),
        in_specs=in_specs,
        out_specs=[per_time, per_state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, n, channels), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((n, block), jnp.float32)] + [pltpu.VMEM((chunk, block), jnp.float32)] * 3,
        # (sequence, channel block, time chunk): the time axis carries the Mamba-1 state in scratch.
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary"), interpret),
        interpret=tpu_interpret(interpret),
        name="selective_scan_tpu",
    )(*args)
    return y, final.swapaxes(1, 2)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def selective_state_update_pallas_tpu(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    *,
    block_sizes: SelectiveStateUpdateTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU version of `selective_state_update_ref` (same contract, any sizes): grid (sequence, block
    of BD channels), BD from `tpu_row_block` (all channels up to `block_sizes.block_d`, else a sublane-tile
    multiple dividing Dm). Blocks span the full N; the per-channel vectors are viewed as [.., Dm, 1]
    columns (free reshapes), so nothing is padded. The state is updated in place."""
    check_step_inputs(state, x, dt, A, B, C, D, z)
    blocks = SelectiveStateUpdateTPUBlockSizes.resolve(block_sizes, "selective_state_update")
    batch, channels, n = state.shape
    dtypes = [a.dtype for a in (state, x, dt, A, D, z) if a is not None]  # all blocked along channels
    block = tpu_row_block(channels, blocks.block_d, *dtypes)
    column = pl.BlockSpec((None, block, 1), lambda b, c: (b, c, 0))
    rows_state = pl.BlockSpec((None, block, n), lambda b, c: (b, c, 0))
    per_sequence = pl.BlockSpec((None, 1, n), lambda b, c: (b, 0, 0))
    per_channel = lambda cols: pl.BlockSpec((block, cols), lambda b, c: (c, 0))  # noqa: E731
    inputs = [
        (state, rows_state),
        (x[..., None], column),
        (dt[..., None], column),
        (A, per_channel(n)),
        (B[:, None], per_sequence),
        (C[:, None], per_sequence),
        (None if D is None else D[:, None], per_channel(1)),
        (None if z is None else z[..., None], column),
    ]
    kernel = functools.partial(state_update_tpu_kernel, has_d=D is not None, has_z=z is not None)
    return decode_step_tpu(
        kernel, (batch, channels // block), inputs, column, rows_state, x, state, 0, "selective_state_update", interpret
    )
