"""Causal conv1d kernels for the Pallas Triton lowering (GPU): prefill and decode step.

Blocks are powers of two and the ragged edges are masked. The shifted taps are read with index-array
loads (gathers) under masks, not `pl.ds` slices, because a slice starting before step 0 would be
clamped rather than masked in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.causal_conv1d.reference import check_kernel_inputs, check_update_kernel_inputs
from pallas_kernels.lowering import triton_params


@dataclasses.dataclass(frozen=True)
class CausalConv1dBlockSizes(BlockSizes):
    """`causal_conv1d_pallas` (prefill): channels per program, steps per time block (powers of two; a
    [16, 64] float32 tile is 8 values per thread at 4 warps), time blocks per program; untuned. Time
    chunks run in parallel, so B=1, C=2048, T=4096 gives 32 x 16 programs. Then the Triton launch
    parameters."""

    block_c: int = 64
    block_t: int = 16
    blocks_per_program: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_c", "block_t")


@dataclasses.dataclass(frozen=True)
class CausalConv1dUpdateBlockSizes(BlockSizes):
    """`causal_conv1d_update_pallas` (decode step): channels per program (a power of two; untuned), and
    the Triton launch parameters."""

    block_c: int = 128
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_c")


def _column(j: int):
    """A static column index as an array: interpret mode's load/store cannot take a bare Python int."""
    return jnp.int32(j)


def _conv_kernel(*refs, steps, channels, taps, block_t, block_c, blocks, has_bias, has_state, silu):
    """One (sequence, channel block, time chunk) program: a loop over `blocks` time blocks of [BT, BC]
    outputs, the K taps as K shifted loads (cache hits after the first). Only the first K-1 steps see the
    state: the chunk-0 program writes them (and the new state) apart, so the loop reads x alone.
    Refs: x/y [T, C] and state/new_state [C, K-1] of the sequence, weight [C, K], bias [C], counts [B]."""
    x_ref, w_ref, counts_ref, *refs = refs
    bias_ref = refs.pop(0) if has_bias else None
    state_ref = refs.pop(0) if has_state else None
    y_ref, new_state_ref = refs
    f32 = jnp.float32
    c0 = pl.program_id(1) * block_c
    cols = c0 + jnp.arange(block_c)
    col_ok = cols < channels

    def inputs(r, c, from_state: bool):
        """x[r, c] for steps r >= 0, else state[c, K-1+r] if `from_state` and there is a state, else 0; in
        x's dtype, for broadcastable index arrays r and c. Masked lanes never touch memory."""
        ok = c < channels
        value = plgpu.load(x_ref.at[r, c], mask=ok & (r >= 0) & (r < steps), other=0.0)
        if from_state and has_state:
            before = plgpu.load(state_ref.at[c, r + (taps - 1)], mask=ok & (r < 0), other=0.0)
            value = jnp.where(r < 0, before.astype(value.dtype), value)
        return value

    w = [plgpu.load(w_ref.at[pl.ds(c0, block_c), _column(k)], mask=col_ok, other=0.0).astype(f32) for k in range(taps)]
    bias = plgpu.load(bias_ref.at[pl.ds(c0, block_c)], mask=col_ok, other=0.0).astype(f32) if has_bias else None

    def outputs(t, from_state: bool):
        """y [N, BC] float32 (before the dtype cast) at steps t: [N, 1]."""
        y = sum(w[k][None, :] * inputs(t - (taps - 1 - k), cols[None, :], from_state).astype(f32) for k in range(taps))
        if has_bias:
            y = y + bias[None, :]
        return y * jax.nn.sigmoid(y) if silu else y

    # Program ids are read outside the loop and `pl.when` (interpret mode cannot evaluate them inside).
    first_block = pl.program_id(2) * blocks
    # New state column j = the input at step counts - (K-1) + j, reaching back into the old state.
    state_start = counts_ref[pl.program_id(0)] - (taps - 1)

    def time_block(i, carry):
        t0 = (first_block + i) * block_t
        t = t0 + jnp.arange(block_t)[:, None]  # [BT, 1]
        plgpu.store(
            y_ref.at[pl.ds(t0, block_t), pl.ds(c0, block_c)],
            outputs(t, False).astype(y_ref.dtype),
            mask=(t >= taps - 1) & (t < steps) & col_ok[None, :],
        )
        return carry

    jax.lax.fori_loop(0, blocks, time_block, 0)

    @pl.when(pl.program_id(2) == 0)
    def _():
        head = pl.next_power_of_2(taps - 1)
        t = jnp.arange(head)[:, None]  # the first K-1 steps, padded to a power of two
        plgpu.store(
            y_ref.at[pl.ds(0, head), pl.ds(c0, block_c)],
            outputs(t, True).astype(y_ref.dtype),
            mask=(t < taps - 1) & (t < steps) & col_ok[None, :],
        )
        for j in range(taps - 1):
            column = inputs(state_start + j, cols, True)
            plgpu.store(
                new_state_ref.at[pl.ds(c0, block_c), _column(j)], column.astype(new_state_ref.dtype), mask=col_ok
            )


@functools.partial(jax.jit, static_argnames=("activation", "block_sizes", "interpret"))
def causal_conv1d_pallas(
    x,
    weight,
    bias=None,
    state=None,
    counts=None,
    activation="silu",
    *,
    block_sizes: CausalConv1dBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `causal_conv1d_ref` (same contract), for K >= 2 and T >= 1. Grid: (sequence,
    block of `block_c` channels, chunk of `blocks_per_program` time blocks of `block_t` steps); nothing is
    carried between time blocks, so every chunk runs in parallel."""
    check_kernel_inputs(x, weight, bias, state, activation)
    blocks = CausalConv1dBlockSizes.resolve(block_sizes, "causal_conv1d")
    batch, steps, channels = x.shape
    taps = weight.shape[1]
    block_c = min(blocks.block_c, pl.next_power_of_2(channels))
    block_t = min(blocks.block_t, pl.next_power_of_2(steps))
    per_program = min(blocks.blocks_per_program, pl.cdiv(steps, block_t))
    grid = (batch, pl.cdiv(channels, block_c), pl.cdiv(steps, block_t * per_program))
    # The reference's window start is clamped into [0, T] (dynamic_slice semantics).
    counts = jnp.full((batch,), steps, jnp.int32) if counts is None else jnp.clip(counts.astype(jnp.int32), 0, steps)
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda b, c, t: (b,) + (0,) * len(shape))  # noqa: E731
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c, t: (0,) * a.ndim)  # noqa: E731
    args = [x, weight, counts] + ([bias] if bias is not None else []) + ([state] if state is not None else [])
    specs = (
        [row(steps, channels), whole(weight), whole(counts)]
        + ([whole(bias)] if bias is not None else [])
        + ([row(channels, taps - 1)] if state is not None else [])
    )
    kernel = functools.partial(
        _conv_kernel,
        steps=steps,
        channels=channels,
        taps=taps,
        block_t=block_t,
        block_c=block_c,
        blocks=per_program,
        has_bias=bias is not None,
        has_state=state is not None,
        silu=activation == "silu",
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=[row(steps, channels), row(channels, taps - 1)],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, channels, taps - 1), x.dtype if state is None else state.dtype),
        ],
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="causal_conv1d",
    )(*args)


def _update_kernel(*refs, channels, taps, block_c, has_bias, silu):
    """One (sequence, channel block) program. Refs: x/y [C], state/new_state [C, K-1] (aliased), weight
    [C, K], bias [C]. The window is kept as K column vectors of the same layout, so every thread reads a
    state element before it overwrites it, and only then (no race through the aliased buffer)."""
    x_ref, w_ref, state_ref, *refs = refs
    bias_ref = refs.pop(0) if has_bias else None
    y_ref, new_state_ref = refs
    f32 = jnp.float32
    c0 = pl.program_id(1) * block_c
    col_ok = c0 + jnp.arange(block_c) < channels
    channel_block = pl.ds(c0, block_c)
    window = [
        plgpu.load(state_ref.at[channel_block, _column(j)], mask=col_ok, other=0.0).astype(f32) for j in range(taps - 1)
    ]
    window.append(plgpu.load(x_ref.at[channel_block], mask=col_ok, other=0.0).astype(f32))
    y = sum(
        plgpu.load(w_ref.at[channel_block, _column(k)], mask=col_ok, other=0.0).astype(f32) * window[k]
        for k in range(taps)
    )
    if has_bias:
        y = y + plgpu.load(bias_ref.at[channel_block], mask=col_ok, other=0.0).astype(f32)
    if silu:
        y = y * jax.nn.sigmoid(y)
    plgpu.store(y_ref.at[channel_block], y.astype(y_ref.dtype), mask=col_ok)
    for j in range(taps - 1):
        plgpu.store(new_state_ref.at[channel_block, _column(j)], window[j + 1].astype(new_state_ref.dtype), mask=col_ok)


@functools.partial(jax.jit, static_argnames=("activation", "block_sizes", "interpret"))
def causal_conv1d_update_pallas(
    x,
    weight,
    bias=None,
    state=None,
    activation="silu",
    *,
    block_sizes: CausalConv1dUpdateBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `causal_conv1d_update_ref` (same contract), for K >= 2: one program per (sequence,
    block of `block_sizes.block_c` channels); the state is updated in place (aliased buffer)."""
    check_update_kernel_inputs(x, weight, bias, state, activation)
    blocks = CausalConv1dUpdateBlockSizes.resolve(block_sizes, "causal_conv1d_update")
    batch, channels = x.shape
    taps = weight.shape[1]
    block_c = min(blocks.block_c, pl.next_power_of_2(channels))
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda b, c: (b,) + (0,) * len(shape))  # noqa: E731
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c: (0,) * a.ndim)  # noqa: E731
    kernel = functools.partial(
        _update_kernel,
        channels=channels,
        taps=taps,
        block_c=block_c,
        has_bias=bias is not None,
        silu=activation == "silu",
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, pl.cdiv(channels, block_c)),
        in_specs=[row(channels), whole(weight), row(channels, taps - 1)] + ([whole(bias)] if bias is not None else []),
        out_specs=[row(channels), row(channels, taps - 1)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={2: 1},
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="causal_conv1d_update",
    )(x, weight, state, *([bias] if bias is not None else []))
