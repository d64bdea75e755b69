"""Causal depthwise 1-D convolution (the short convolution of Mamba / Mamba-2 blocks), and its decode step.

Each channel c is convolved with its own K taps; the output at step t sees inputs t-K+1..t. The
previous K-1 inputs of a sequence are its "conv state" `[B, C, K-1]` (oldest first), so a prefill
can continue a cached sequence and a decode step needs only the state and one new input.

The Pallas kernels take any C and T (and K >= 2): blocks are powers of two and the ragged edges are
masked. The shifted taps are read with index-array loads (gathers) under masks, not `pl.ds` slices,
because a slice starting before step 0 would be clamped rather than masked in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.gpu_params import (
    CAUSAL_CONV1D_BLOCKS_PER_PROGRAM,
    CAUSAL_CONV1D_CHANNEL_BLOCK,
    CAUSAL_CONV1D_TIME_BLOCK,
    CAUSAL_CONV1D_UPDATE_BLOCK,
    compiler_params,
)
from pallas_kernels.tpu_params import (
    CAUSAL_CONV1D_TPU,
    CAUSAL_CONV1D_UPDATE_TPU_BLOCK,
    tpu_compiler_params,
    tpu_interpret,
    tpu_row_block,
)

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
UPDATE_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
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


def _kernel_takes(taps: int, steps: int) -> bool:
    """The Pallas kernels (GPU and TPU) need K >= 2 taps and T >= 1 steps."""
    return taps >= 2 and steps >= 1


def _check_kernel_inputs(x, weight, bias, state, activation):
    _check(x, weight, bias, state, activation)
    taps, steps = weight.shape[1], x.shape[1]
    if not _kernel_takes(taps, steps):
        raise ValueError(f"causal_conv1d: the Pallas kernel needs K >= 2 taps and T >= 1 steps, got K={taps}, "
                         f"T={steps}; use impl='xla'")


def _check_update_kernel_inputs(x, weight, bias, state, activation):
    if state is None:
        raise ValueError("causal_conv1d_update: a decode step needs the conv state [B, C, K-1], got None")
    _check(x[:, None], weight, bias, state, activation)
    taps = weight.shape[1]
    if not _kernel_takes(taps, 1):
        raise ValueError(f"causal_conv1d_update: the Pallas kernel needs K >= 2 taps, got K={taps}; use impl='xla'")


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

    w = [plgpu.load(w_ref.at[pl.ds(c0, block_c), _column(k)], mask=col_ok, other=0.0).astype(f32)
         for k in range(taps)]
    bias = plgpu.load(bias_ref.at[pl.ds(c0, block_c)], mask=col_ok, other=0.0).astype(f32) if has_bias else None

    def outputs(t, from_state: bool):
        """y [N, BC] float32 (before the dtype cast) at steps t: [N, 1]."""
        y = sum(w[k][None, :] * inputs(t - (taps - 1 - k), cols[None, :], from_state).astype(f32)
                for k in range(taps))
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
        plgpu.store(y_ref.at[pl.ds(t0, block_t), pl.ds(c0, block_c)], outputs(t, False).astype(y_ref.dtype),
                    mask=(t >= taps - 1) & (t < steps) & col_ok[None, :])
        return carry

    jax.lax.fori_loop(0, blocks, time_block, 0)

    @pl.when(pl.program_id(2) == 0)
    def _():
        head = pl.next_power_of_2(taps - 1)
        t = jnp.arange(head)[:, None]  # the first K-1 steps, padded to a power of two
        plgpu.store(y_ref.at[pl.ds(0, head), pl.ds(c0, block_c)], outputs(t, True).astype(y_ref.dtype),
                    mask=(t < taps - 1) & (t < steps) & col_ok[None, :])
        for j in range(taps - 1):
            column = inputs(state_start + j, cols, True)
            plgpu.store(new_state_ref.at[pl.ds(c0, block_c), _column(j)], column.astype(new_state_ref.dtype),
                        mask=col_ok)


def causal_conv1d_pallas(x, weight, bias=None, state=None, counts=None, activation="silu", *,
                         interpret: bool = False):
    """Pallas version of `causal_conv1d_ref` (same contract), for K >= 2 and T >= 1. Grid: (sequence,
    block of CAUSAL_CONV1D_CHANNEL_BLOCK channels, chunk of CAUSAL_CONV1D_BLOCKS_PER_PROGRAM time blocks
    of CAUSAL_CONV1D_TIME_BLOCK steps); nothing is carried between time blocks, so every chunk runs in
    parallel."""
    _check_kernel_inputs(x, weight, bias, state, activation)
    batch, steps, channels = x.shape
    taps = weight.shape[1]
    block_c = min(CAUSAL_CONV1D_CHANNEL_BLOCK, pl.next_power_of_2(channels))
    block_t = min(CAUSAL_CONV1D_TIME_BLOCK, pl.next_power_of_2(steps))
    blocks = min(CAUSAL_CONV1D_BLOCKS_PER_PROGRAM, pl.cdiv(steps, block_t))
    grid = (batch, pl.cdiv(channels, block_c), pl.cdiv(steps, block_t * blocks))
    # The reference's window start is clamped into [0, T] (dynamic_slice semantics).
    counts = jnp.full((batch,), steps, jnp.int32) if counts is None else jnp.clip(counts.astype(jnp.int32), 0, steps)
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda b, c, t: (b,) + (0,) * len(shape))  # noqa: E731
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c, t: (0,) * a.ndim)  # noqa: E731
    args = [x, weight, counts] + ([bias] if bias is not None else []) + ([state] if state is not None else [])
    specs = [row(steps, channels), whole(weight), whole(counts)] + ([whole(bias)] if bias is not None else []) \
        + ([row(channels, taps - 1)] if state is not None else [])
    kernel = functools.partial(_conv_kernel, steps=steps, channels=channels, taps=taps, block_t=block_t,
                               block_c=block_c, blocks=blocks, has_bias=bias is not None,
                               has_state=state is not None, silu=activation == "silu")
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=[row(steps, channels), row(channels, taps - 1)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((batch, channels, taps - 1), x.dtype if state is None else state.dtype)],
        compiler_params=compiler_params("causal_conv1d", interpret),
        interpret=interpret,
        name="causal_conv1d",
    )(*args)


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
    if has_bias:
        y = y + bias_ref[...].astype(f32)
    if silu:
        y = y * jax.nn.sigmoid(y)
    y_ref[...] = y.astype(y_ref.dtype)


def causal_conv1d_pallas_tpu(x, weight, bias=None, state=None, counts=None, activation="silu", *,
                             interpret: bool = False):
    """Mosaic TPU version of `causal_conv1d_ref` (same contract), for K >= 2 and T >= 1; channels on lanes.

    The wrapper builds the padded input [B, K-1 + T + pad, C] (state prepended, zeros appended so every
    block and halo lies inside it; one copy, which the reference makes too). Grid (sequence, block of BC
    channels, block of BT steps), all independent: each program reads its BT padded rows plus the H
    rows after them (H = K-1 rounded up to the sublane tile, BT a multiple of H) through a second
    BlockSpec, and writes y with bias + SiLU fused; ragged edge blocks of y are clipped by Pallas. The new
    state is a per-sequence dynamic slice of the padded input, as in the reference. BC and BT: at most
    CAUSAL_CONV1D_TPU's (BC: all of C or a multiple of 128)."""
    _check_kernel_inputs(x, weight, bias, state, activation)
    batch, steps, channels = x.shape
    taps = weight.shape[1]
    tile = 32 // jnp.dtype(x.dtype).itemsize  # sublane tile of the padded input and y
    halo = pl.cdiv(taps - 1, tile) * tile
    block_t = pl.cdiv(min(steps, CAUSAL_CONV1D_TPU["block_t"]), halo) * halo
    block_c = channels if channels <= CAUSAL_CONV1D_TPU["block_c"] else CAUSAL_CONV1D_TPU["block_c"]
    time_blocks = pl.cdiv(steps, block_t)
    if state is None:
        state = jnp.zeros((batch, channels, taps - 1), x.dtype)
    tail = time_blocks * block_t + halo - (taps - 1 + steps)
    padded = jnp.concatenate([state.transpose(0, 2, 1).astype(x.dtype), x,
                              jnp.zeros((batch, tail, channels), x.dtype)], axis=1)
    per_halo = block_t // halo
    in_specs = [pl.BlockSpec((None, block_t, block_c), lambda b, c, t: (b, t, c)),
                pl.BlockSpec((None, halo, block_c), lambda b, c, t: (b, (t + 1) * per_halo, c)),
                pl.BlockSpec((taps, block_c), lambda b, c, t: (0, c))]
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
        compiler_params=tpu_compiler_params("causal_conv1d", interpret),
        interpret=tpu_interpret(interpret),
        name="causal_conv1d",
    )(*args)
    # As in the reference: x[t] sits at padded[t + K - 1], the window start is clamped into [0, T].
    counts = jnp.full((batch,), steps, jnp.int32) if counts is None else jnp.clip(counts.astype(jnp.int32), 0, steps)
    window = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, taps - 1, axis=0))(padded, counts)
    return y, window.transpose(0, 2, 1).astype(state.dtype)


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
    window = [plgpu.load(state_ref.at[channel_block, _column(j)], mask=col_ok, other=0.0).astype(f32)
              for j in range(taps - 1)]
    window.append(plgpu.load(x_ref.at[channel_block], mask=col_ok, other=0.0).astype(f32))
    y = sum(plgpu.load(w_ref.at[channel_block, _column(k)], mask=col_ok, other=0.0).astype(f32) * window[k]
            for k in range(taps))
    if has_bias:
        y = y + plgpu.load(bias_ref.at[channel_block], mask=col_ok, other=0.0).astype(f32)
    if silu:
        y = y * jax.nn.sigmoid(y)
    plgpu.store(y_ref.at[channel_block], y.astype(y_ref.dtype), mask=col_ok)
    for j in range(taps - 1):
        plgpu.store(new_state_ref.at[channel_block, _column(j)], window[j + 1].astype(new_state_ref.dtype), mask=col_ok)


def causal_conv1d_update_pallas(x, weight, bias=None, state=None, activation="silu", *, interpret: bool = False):
    """Pallas version of `causal_conv1d_update_ref` (same contract), for K >= 2: one program per (sequence,
    block of CAUSAL_CONV1D_UPDATE_BLOCK channels); the state is updated in place (aliased buffer)."""
    _check_update_kernel_inputs(x, weight, bias, state, activation)
    batch, channels = x.shape
    taps = weight.shape[1]
    block_c = min(CAUSAL_CONV1D_UPDATE_BLOCK, pl.next_power_of_2(channels))
    row = lambda *shape: pl.BlockSpec((None, *shape), lambda b, c: (b,) + (0,) * len(shape))  # noqa: E731
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, c: (0,) * a.ndim)  # noqa: E731
    kernel = functools.partial(_update_kernel, channels=channels, taps=taps, block_c=block_c,
                               has_bias=bias is not None, silu=activation == "silu")
    return pl.pallas_call(
        kernel,
        grid=(batch, pl.cdiv(channels, block_c)),
        in_specs=[row(channels), whole(weight), row(channels, taps - 1)] + ([whole(bias)] if bias is not None else []),
        out_specs=[row(channels), row(channels, taps - 1)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={2: 1},
        compiler_params=compiler_params("causal_conv1d_update", interpret),
        interpret=interpret,
        name="causal_conv1d_update",
    )(x, weight, state, *([bias] if bias is not None else []))


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
    y = sum(column(w, k) * window[k] for k in range(taps))
    if has_bias:
        y = y + bias_ref[...].astype(f32)
    if silu:
        y = y * jax.nn.sigmoid(y)
    y_ref[...] = y.astype(y_ref.dtype)
    state_lane = lane(state)
    new_state = sum(jnp.where(state_lane == j, window[j + 1], 0.0) for j in range(taps - 1))
    new_state_ref[...] = new_state.astype(new_state_ref.dtype)


def causal_conv1d_update_pallas_tpu(x, weight, bias=None, state=None, activation="silu", *,
                                    interpret: bool = False):
    """Mosaic TPU version of `causal_conv1d_update_ref` (same contract, any C, K >= 2): grid (sequence,
    block of BC channels), BC from `tpu_row_block` (all channels up to CAUSAL_CONV1D_UPDATE_TPU_BLOCK, else
    a sublane-tile multiple dividing C). Blocks span the full K-1 / K; x and bias are viewed as [.., C, 1]
    columns (free reshapes), so nothing is padded. The state is updated in place (aliased buffer)."""
    _check_update_kernel_inputs(x, weight, bias, state, activation)
    batch, channels = x.shape
    taps = weight.shape[1]
    dtypes = [a.dtype for a in (x, weight, bias, state) if a is not None]
    block = tpu_row_block(channels, CAUSAL_CONV1D_UPDATE_TPU_BLOCK, *dtypes)
    per_sequence = lambda cols: pl.BlockSpec((None, block, cols), lambda b, c: (b, c, 0))  # noqa: E731
    per_channel = lambda cols: pl.BlockSpec((block, cols), lambda b, c: (c, 0))  # noqa: E731
    in_specs = [per_sequence(1), per_channel(taps), per_sequence(taps - 1)]
    args = [x[..., None], weight, state]
    if bias is not None:
        in_specs.append(per_channel(1))
        args.append(bias[:, None])
    y, new_state = pl.pallas_call(
        functools.partial(_update_tpu_kernel, taps=taps, has_bias=bias is not None, silu=activation == "silu"),
        grid=(batch, channels // block),
        in_specs=in_specs,
        out_specs=[per_sequence(1), per_sequence(taps - 1)],
        out_shape=[jax.ShapeDtypeStruct((*x.shape, 1), x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={2: 1},
        compiler_params=tpu_compiler_params("causal_conv1d_update", interpret),
        interpret=tpu_interpret(interpret),
        name="causal_conv1d_update",
    )(*args)
    return y[..., 0], new_state


def causal_conv1d(x, weight, bias=None, state=None, counts=None, activation="silu", *, impl="auto"):
    """Dispatcher for `causal_conv1d_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    The Pallas kernel needs K >= 2 and T >= 1: otherwise "auto" uses the reference and the others raise. On TPU
    "pallas" runs `causal_conv1d_pallas_tpu`."""
    kind = resolve_impl(impl, "causal_conv1d", PALLAS_BACKENDS)
    if kind == "xla" or (impl == "auto" and not _kernel_takes(weight.shape[1], x.shape[1])):
        return causal_conv1d_ref(x, weight, bias, state, counts, activation)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return causal_conv1d_pallas_tpu(x, weight, bias, state, counts, activation)
    return causal_conv1d_pallas(x, weight, bias, state, counts, activation, interpret=kind == "interpret")


def causal_conv1d_update(x, weight, bias=None, state=None, activation="silu", *, impl="auto"):
    """Dispatcher for `causal_conv1d_update_ref`'s contract (see there); K = 1 as in `causal_conv1d`. On TPU
    "pallas" runs `causal_conv1d_update_pallas_tpu`."""
    kind = resolve_impl(impl, "causal_conv1d_update", UPDATE_PALLAS_BACKENDS)
    if kind == "xla" or (impl == "auto" and not _kernel_takes(weight.shape[1], 1)):
        return causal_conv1d_update_ref(x, weight, bias, state, activation)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return causal_conv1d_update_pallas_tpu(x, weight, bias, state, activation)
    return causal_conv1d_update_pallas(x, weight, bias, state, activation, interpret=kind == "interpret")
