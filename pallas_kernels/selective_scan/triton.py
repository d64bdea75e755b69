"""Mamba-1 kernels for the Pallas Triton lowering (GPU): the selective scan and the state update."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.lowering import triton_params
from pallas_kernels.selective_scan.reference import check_inputs, check_step_inputs, selective_scan_ref
from pallas_kernels.state_update import state_update_kernel


@dataclasses.dataclass(frozen=True)
class SelectiveScanBlockSizes(BlockSizes):
    """`selective_scan_pallas` (prefill): channels per program and time steps loaded at once (powers of
    two). Small channel blocks give more programs for the sequential walk over time (Dm=1536, Bt=1: 48
    programs). Then the Triton launch parameters. Measured on an H200 (a Mamba-1.4B layer, b2 t2048,
    d_inner 4096, N 16; experiments/results/gpu_h200/run2): 16 channels with 2 warps 4859 us; with 4 warps,
    16 channels 7468 us, 32 channels 7894 us, 64 channels 8922 us, 32 channels and 32 steps 7256 us."""

    block_d: int = 16
    block_t: int = 16
    num_warps: int = 2
    num_stages: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_d", "block_t")


@dataclasses.dataclass(frozen=True)
class SelectiveStateUpdateBlockSizes(BlockSizes):
    """Channels per program of `selective_state_update_pallas` (a power of two; Triton blocks must be;
    the largest power of two dividing Dm is taken below it), and the Triton launch parameters."""

    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_d")


def _scan_kernel(*refs, steps: int, channels: int, n: int, chunk: int, has_d: bool, has_z: bool, has_state: bool):
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
    h = (
        plgpu.load(state_ref.at[:, states], mask=state_ok, other=0.0).astype(f32)
        if has_state
        else jnp.zeros((block, n_pad), f32)
    )
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


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def selective_scan_pallas(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    state=None,
    *,
    block_sizes: SelectiveScanBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `selective_scan_ref` (same contract; any sizes). Grid (sequence, block of
    `block_sizes.block_d` channels): each program keeps its [block, N] state on chip and walks time,
    loading x/dt/z and B/C `block_sizes.block_t` steps at a time and storing y a chunk at a time."""
    check_inputs(x, dt, A, B, C, D, z, state)
    blocks = SelectiveScanBlockSizes.resolve(block_sizes, "selective_scan")
    batch, steps, channels = x.shape
    n = A.shape[-1]
    if steps == 0:  # nothing to launch
        return selective_scan_ref(x, dt, A, B, C, D, z, state)
    block = min(blocks.block_d, pl.next_power_of_2(channels))
    chunk = min(blocks.block_t, pl.next_power_of_2(steps))
    per_time = pl.BlockSpec((None, steps, block), lambda b, c: (b, 0, c))
    per_step = pl.BlockSpec((None, steps, n), lambda b, c: (b, 0, 0))
    per_state = pl.BlockSpec((None, block, n), lambda b, c: (b, c, 0))
    optional = [(D, pl.BlockSpec((block,), lambda b, c: (c,))), (z, per_time), (state, per_state)]
    optional = [(a, spec) for a, spec in optional if a is not None]
    kernel = functools.partial(
        _scan_kernel,
        steps=steps,
        channels=channels,
        n=n,
        chunk=chunk,
        has_d=D is not None,
        has_z=z is not None,
        has_state=state is not None,
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, pl.cdiv(channels, block)),
        in_specs=[
            per_time,
            per_time,
            pl.BlockSpec((block, n), lambda b, c: (c, 0)),
            per_step,
            per_step,
            *(spec for _, spec in optional),
        ],
        out_specs=[per_time, per_state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, channels, n), jnp.float32)],
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="selective_scan",
    )(x, dt, A, B, C, *(a for a, _ in optional))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def selective_state_update_pallas(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    *,
    block_sizes: SelectiveStateUpdateBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `selective_state_update_ref` (same contract): one program per (sequence,
    block of channels: the largest power of two <= `block_sizes.block_d` dividing Dm) with its [block, N]
    state on chip, updated in place (aliased buffer)."""
    check_step_inputs(state, x, dt, A, B, C, D, z)
    blocks = SelectiveStateUpdateBlockSizes.resolve(block_sizes, "selective_state_update")
    batch, channels, n = state.shape
    block = blocks.block_d
    while channels % block:
        block //= 2
    D = jnp.zeros((channels,), jnp.float32) if D is None else D
    rows = pl.BlockSpec((None, block), lambda b, c: (b, c))
    rows_state = pl.BlockSpec((None, block, n), lambda b, c: (b, c, 0))
    per_sequence = pl.BlockSpec((None, n), lambda b, c: (b, 0))
    return pl.pallas_call(
        functools.partial(state_update_kernel, gate=z is not None),
        grid=(batch, channels // block),
        in_specs=[
            rows_state,
            rows,
            rows,
            pl.BlockSpec((block, n), lambda b, c: (c, 0)),
            per_sequence,
            per_sequence,
            pl.BlockSpec((block,), lambda b, c: (c,)),
        ]
        + ([rows] if z is not None else []),
        out_specs=[rows, rows_state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="selective_state_update",
    )(state, x, dt, A, B, C, D, *([z] if z is not None else []))
