"""Causal conv1d kernels for Mosaic TPU: prefill and decode step, channels on lanes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.causal_conv1d.reference import check_kernel_inputs, check_update_kernel_inputs, final_window
from pallas_kernels.lowering import tpu_interpret, tpu_params, tpu_row_block
from pallas_kernels.state_update import decode_step_tpu


@dataclasses.dataclass(frozen=True)
class CausalConv1dTPUBlockSizes(BlockSizes):
    """`causal_conv1d_pallas_tpu` (prefill): most steps (rows) and channels (lanes; a multiple of 128) per
    block: a 256 x 512 float32 x/y block is 512 KiB, a few of them double-buffered plus the float32 window
    stay far below VMEM."""

    block_t: int = 256
    block_c: int = 512

    def __post_init__(self):
        super().__post_init__()
        self._multiples(128, "block_c")


@dataclasses.dataclass(frozen=True)
class CausalConv1dUpdateTPUBlockSizes(BlockSizes):
    """Most channels per program of `causal_conv1d_update_pallas_tpu` (VMEM stays small: [512, K] blocks)."""

    block_c: int = 512


def _finish(y, bias_ref, silu: bool, y_ref):
    """Adds the bias, applies SiLU and stores y (float32) in y_ref's dtype."""
    if bias_ref is not None:
        y = y + bias_ref[...].astype(jnp.float32)
    if silu:
        y = y * jax.nn.sigmoid(y)
    y_ref[...] = y.astype(y_ref.dtype)


def _conv_tpu_kernel(x_ref, halo_ref, w_ref, *refs, taps, has_bias, silu):
    """One (sequence, channel block, time block) program: y [BT, BC] from the BT padded-input rows of the
    block and the H rows after it (halo); w [K, BC], bias [1, BC]. Tap k reads the window shifted up by
    k rows: a sublane roll of the float32 window and an aligned slice (no unaligned sublane slices)."""
    bias_ref, y_ref = refs if has_bias else (None, *refs)
    f32 = jnp.float32
    block_t = x_ref.shape[0]
    window = jnp.concatenate([x_ref[...].astype(f32), halo_ref[...].astype(f32)], axis=0)  # [BT + H, BC]
    rows, w = window.shape[0], w_ref[...].astype(f32)
    y = window[:block_t] * w[0:1]
    for k in range(1, taps):
        y = y + pltpu.roll(window, rows - k, 0)[:block_t] * w[k : k + 1]  # row t <- window row t + k
    _finish(y, bias_ref, silu, y_ref)


@functools.partial(jax.jit, static_argnames=("activation", "block_sizes", "interpret"))
def causal_conv1d_pallas_tpu(
    x,
    weight,
    bias=None,
    state=None,
    counts=None,
    activation="silu",
    *,
    block_sizes: CausalConv1dTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU version of `causal_conv1d_ref` (same contract), for K >= 2 and T >= 1; channels on lanes.

    The wrapper builds the padded input [B, K-1 + T + pad, C] (state prepended, zeros appended so every
    block and halo lies inside it; one copy, which the reference makes too). Grid (sequence, block of BC
    channels, block of BT steps), all independent: each program reads its BT padded rows plus the H
    rows after them (H = K-1 rounded up to the sublane tile, BT a multiple of H) through a second
    BlockSpec, and writes y with bias + SiLU fused; ragged edge blocks of y are clipped by Pallas. The new
    state is a per-sequence dynamic slice of the padded input, as in the reference. BC and BT: at most
    `block_sizes`' (BC: all of C or a multiple of 128)."""
    check_kernel_inputs(x, weight, bias, state, activation)
    blocks = CausalConv1dTPUBlockSizes.resolve(block_sizes, "causal_conv1d")
    batch, steps, channels = x.shape
    taps = weight.shape[1]
    tile = 32 // jnp.dtype(x.dtype).itemsize  # sublane tile of the padded input and y
    halo = pl.cdiv(taps - 1, tile) * tile
    block_t = pl.cdiv(min(steps, blocks.block_t), halo) * halo
    block_c = channels if channels <= blocks.block_c else blocks.block_c
    time_blocks = pl.cdiv(steps, block_t)
    if state is None:
        state = jnp.zeros((batch, channels, taps - 1), x.dtype)
    tail = time_blocks * block_t + halo - (taps - 1 + steps)
    padded = jnp.concatenate(
        [state.transpose(0, 2, 1).astype(x.dtype), x, jnp.zeros((batch, tail, channels), x.dtype)], axis=1
    )
    per_halo = block_t // halo
    in_specs = [
        pl.BlockSpec((None, block_t, block_c), lambda b, c, t: (b, t, c)),
        pl.BlockSpec((None, halo, block_c), lambda b, c, t: (b, (t + 1) * per_halo, c)),
        pl.BlockSpec((taps, block_c), lambda b, c, t: (0, c)),
    ]
    args = [padded, padded, weight.T]
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, block_c), lambda b, c, t: (0, c)))
        args.append(bias[None, :])
    y = pl.pallas_call(
        functools.partial(_conv_tpu_kernel, taps=taps, has_bias=bias is not None, silu=activation == "silu"),
        grid=(batch, pl.cdiv(channels, block_c), time_blocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_t, block_c), lambda b, c, t: (b, t, c)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        # (sequence, channel block, time block): each time block reads its own halo rows, nothing is carried.
        compiler_params=tpu_params(("parallel", "parallel", "parallel"), interpret),
        interpret=tpu_interpret(interpret),
        name="causal_conv1d",
    )(*args)
    counts = jnp.full((batch,), steps, jnp.int32) if counts is None else jnp.clip(counts.astype(jnp.int32), 0, steps)
    return y, final_window(padded, counts, taps).astype(state.dtype)


def _update_tpu_kernel(x_ref, w_ref, state_ref, *refs, taps, has_bias, silu):
    """One (sequence, channel block) program: x, y, bias [BC, 1] columns; weight [BC, K]; state and
    new_state [BC, K-1]. The taps lie along lanes: single columns are picked out by masked lane sums and
    put back by selects, which Mosaic lowers for any K (no unaligned lane slices or concatenation)."""
    bias_ref, y_ref, new_state_ref = refs if has_bias else (None, *refs)
    f32 = jnp.float32
    state, w = state_ref[...].astype(f32), w_ref[...].astype(f32)
    lane = lambda a: jax.lax.broadcasted_iota(jnp.int32, a.shape, 1)  # noqa: E731
    column = lambda a, j: jnp.sum(jnp.where(lane(a) == j, a, 0.0), axis=1, keepdims=True)  # noqa: E731
    window = [column(state, j) for j in range(taps - 1)] + [x_ref[...].astype(f32)]  # oldest first
    _finish(sum(column(w, k) * window[k] for k in range(taps)), bias_ref, silu, y_ref)
    state_lane = lane(state)
    new_state = sum(jnp.where(state_lane == j, window[j + 1], 0.0) for j in range(taps - 1))
    new_state_ref[...] = new_state.astype(new_state_ref.dtype)


@functools.partial(jax.jit, static_argnames=("activation", "block_sizes", "interpret"))
def causal_conv1d_update_pallas_tpu(
    x,
    weight,
    bias=None,
    state=None,
    activation="silu",
    *,
    block_sizes: CausalConv1dUpdateTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU version of `causal_conv1d_update_ref` (same contract, any C, K >= 2): grid (sequence,
    block of BC channels), BC from `tpu_row_block` (all channels up to `block_sizes.block_c`, else a
    sublane-tile multiple dividing C). Blocks span the full K-1 / K; x and bias are viewed as [.., C, 1]
    columns (free reshapes), so nothing is padded. The state is updated in place (aliased buffer)."""
    check_update_kernel_inputs(x, weight, bias, state, activation)
    blocks = CausalConv1dUpdateTPUBlockSizes.resolve(block_sizes, "causal_conv1d_update")
    batch, channels = x.shape
    taps = weight.shape[1]
    dtypes = [a.dtype for a in (x, weight, bias, state) if a is not None]
    block = tpu_row_block(channels, blocks.block_c, *dtypes)
    per_sequence = lambda cols: pl.BlockSpec((None, block, cols), lambda b, c: (b, c, 0))  # noqa: E731
    per_channel = lambda cols: pl.BlockSpec((block, cols), lambda b, c: (c, 0))  # noqa: E731
    inputs = [
        (x[..., None], per_sequence(1)),
        (weight, per_channel(taps)),
        (state, per_sequence(taps - 1)),
        (None if bias is None else bias[:, None], per_channel(1)),
    ]
    kernel = functools.partial(_update_tpu_kernel, taps=taps, has_bias=bias is not None, silu=activation == "silu")
    return decode_step_tpu(
        kernel,
        (batch, channels // block),
        inputs,
        per_sequence(1),
        per_sequence(taps - 1),
        x,
        state,
        2,
        "causal_conv1d_update",
        interpret,
    )
