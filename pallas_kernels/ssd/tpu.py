"""Mamba-2 SSD kernels for Mosaic TPU: the chunked scan and the decode step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.lowering import tpu_interpret, tpu_params
from pallas_kernels.ssd.reference import check_chunk_size, check_inputs, check_step_inputs
from pallas_kernels.state_update import decode_step_tpu, state_update_tpu_kernel


@dataclasses.dataclass(frozen=True)
class SSDChunkedTPUBlockSizes(BlockSizes):
    """Steps per chunk of `ssd_chunked_pallas_tpu` (a multiple of 16, the bf16 sublane tile; T when
    shorter): the [L, L] float32 in-chunk matrices (128 x 128: 64 KiB each) and the [P, N] state
    scratch stay small in VMEM."""

    chunk: int = 128

    def __post_init__(self):
        super().__post_init__()
        self._multiples(16, "chunk")


@functools.partial(jax.jit, static_argnames=("interpret",))
def ssd_step_pallas_tpu(state, x, dt, A, B, C, D=None, *, interpret: bool = False):
    """Mosaic TPU version of `ssd_step_ref` (same contract, any sizes): grid (sequence, head), each
    program's blocks span full trailing array dims (the [P, N] state; x, dt, A, B, C, D viewed with
    trailing unit dims, free reshapes), so no padding is needed. The state is updated in place."""
    check_step_inputs(state, x, dt, A, B, C, D)
    batch, heads, head_dim, n = state.shape
    rep = heads // B.shape[1]
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda b, h: (b, h, 0, 0))  # noqa: E731
    # lax.div, not //: floor division's sign fix-up needs the TPU generation to lower (h >= 0 anyway).
    per_group = pl.BlockSpec((None, None, 1, n), lambda b, h: (b, jax.lax.div(h, rep), 0, 0))
    head_scalar = pl.BlockSpec((None, 1, 1), lambda b, h: (h, 0, 0))
    inputs = [
        (state, per_head(head_dim, n)),
        (x[..., None], per_head(head_dim, 1)),
        (dt[..., None, None], per_head(1, 1)),
        (A[:, None, None], head_scalar),
        (B[:, :, None], per_group),
        (C[:, :, None], per_group),
        (None if D is None else D[:, None, None], head_scalar),
    ]
    kernel = functools.partial(state_update_tpu_kernel, has_d=D is not None, has_z=False)
    return decode_step_tpu(
        kernel, (batch, heads), inputs, per_head(head_dim, 1), per_head(head_dim, n), x, state, 0, "ssd_step", interpret
    )


def _ssd_chunked_tpu_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, steps: int, has_d: bool, has_state: bool):
    """One (sequence, head, chunk) program, chunks in order. Refs: x/y [L, P]; dt [L, 1]; A/D [1, 1]; B/C [L, N]
    of the head's group; state/final [P, N]; scratch: the [P, N] float32 state entering the chunk."""
    refs = list(refs)
    D_ref = refs.pop(0) if has_d else None
    state_ref = refs.pop(0) if has_state else None
    y_ref, final_ref, h_ref = refs
    f32 = jnp.float32
    c = pl.program_id(2)
    chunk = x_ref.shape[0]

    @pl.when(c == 0)
    def _():
        h_ref[...] = state_ref[...].astype(f32) if has_state else jnp.zeros(h_ref.shape, f32)

    # The last chunk may overhang T: its rows beyond T hold garbage (maybe NaN, which 0 * would keep), so
    # dt, x and B are zeroed there (those steps then leave the state unchanged); C's rows only reach
    # output rows beyond T, which are not written back.
    t_ok = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) < steps
    dt = jnp.where(t_ok, dt_ref[...], 0.0)  # [L, 1]
    x = jnp.where(t_ok, x_ref[...].astype(f32), 0.0)
    B = jnp.where(t_ok, B_ref[...], jnp.zeros((), B_ref.dtype))
    C = C_ref[...]
    a = dt * A_ref[...].astype(f32)  # [L, 1]
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = row >= col
    # Column [L, 1] -> row [1, L] orientations by masked reductions (no vector transposes); the inclusive
    # cumsum of dt * A in both orientations likewise (a[k] summed over k <= l).
    to_row = lambda v: jnp.sum(jnp.where(row == col, v, 0.0), axis=0, keepdims=True)  # noqa: E731
    cum = jnp.sum(jnp.where(causal, to_row(a), 0.0), axis=1, keepdims=True)  # [L, 1]
    cum_row = jnp.sum(jnp.where(row <= col, a, 0.0), axis=0, keepdims=True)  # [1, L]
    total = jnp.sum(a, axis=0, keepdims=True)  # [1, 1]
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=f32)
    # Within the chunk: y[l] = sum_{s <= l} (C[l] . B[s]) exp(cum[l] - cum[s]) dt[s] x[s], masked before exp
    # so nothing overflows above the diagonal. C B^T in the input dtype: its products are exact in float32.
    decay = jnp.exp(jnp.where(causal, cum - cum_row, -jnp.inf))
    scores = dot(C, B, (((1,), (1,)), ((), ())))  # [L, L]
    y = jnp.dot(scores * decay * to_row(dt), x, preferred_element_type=f32)
    # The entering state read out by C, decayed to each step; plus the skip connection.
    h = h_ref[...]
    y += dot(C.astype(f32), h, (((1,), (1,)), ((), ()))) * jnp.exp(cum)
    if has_d:
        y += D_ref[...].astype(f32) * x
    y_ref[...] = y.astype(y_ref.dtype)
    # The state at the chunk's end: decayed entering state plus each step's input decayed to the end.
    h_ref[...] = h * jnp.exp(total) + jnp.dot(
        x.T, B.astype(f32) * (dt * jnp.exp(total - cum)), preferred_element_type=f32
    )

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = h_ref[...]


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_sizes", "interpret"))
def ssd_chunked_pallas_tpu(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    state=None,
    chunk_size: int = 256,
    *,
    block_sizes: SSDChunkedTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU version of `ssd_chunked_ref` (same contract, any sizes; `chunk_size` is validated but, as
    the result does not depend on it, the kernel's chunk is `block_sizes.chunk`, or T when shorter).

    Grid (sequence, head, chunk), the chunk axis sequential with the head's [P, N] float32 state in VMEM
    scratch (loaded from `state` or zeroed at the first chunk, written to the final state at the last).
    Heads move before time (x, y: [Bt, H, T, P]; dt: [Bt, H, T, 1]), so blocks are [L, P] tiles; B/C are
    read in place as [Bt, T, G * N] when N is a multiple of 128 or G = 1 (else also moved to [Bt, G, T, N]),
    never repeated per head. T is not padded: the last chunk is masked in the kernel.
    """
    check_inputs(x, dt, A, B, C, D, state)
    check_chunk_size(chunk_size)
    blocks = SSDChunkedTPUBlockSizes.resolve(block_sizes, "ssd_chunked")
    batch, steps, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    chunk = min(blocks.chunk, steps)
    per_head = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, c: (b, h, c, 0))  # noqa: E731
    head_scalar = pl.BlockSpec((None, 1, 1), lambda b, h, c: (h, 0, 0))
    # lax.div, not //: floor division's sign fix-up needs the TPU generation to lower (h >= 0 anyway).
    if groups == 1 or n % 128 == 0:  # a lane-aligned [L, N] block of the [Bt, T, G * N] view: no copy
        B, C = B.reshape(batch, steps, groups * n), C.reshape(batch, steps, groups * n)
        group_rows = pl.BlockSpec((None, chunk, n), lambda b, h, c: (b, c, jax.lax.div(h, rep)))
    else:
        B, C = B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3)
        group_rows = pl.BlockSpec((None, None, chunk, n), lambda b, h, c: (b, jax.lax.div(h, rep), c, 0))
    state_block = pl.BlockSpec((None, None, head_dim, n), lambda b, h, c: (b, h, 0, 0))
    in_specs = [per_head(head_dim), per_head(1), head_scalar, group_rows, group_rows]
    args = [x.transpose(0, 2, 1, 3), dt.astype(jnp.float32).transpose(0, 2, 1)[..., None], A[:, None, None], B, C]
    if D is not None:
        in_specs.append(head_scalar)
        args.append(D[:, None, None])
    if state is not None:  # no zero state is read from memory when there is none
        in_specs.append(state_block)
        args.append(state)
    y, final = pl.pallas_call(
        functools.partial(_ssd_chunked_tpu_kernel, steps=steps, has_d=D is not None, has_state=state is not None),
        grid=(batch, heads, pl.cdiv(steps, chunk)),
        in_specs=in_specs,
        out_specs=[per_head(head_dim), state_block],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, steps, head_dim), x.dtype),
            jax.ShapeDtypeStruct((batch, heads, head_dim, n), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((head_dim, n), jnp.float32)],
        # (sequence, head, chunk): the chunk axis carries the SSD state in scratch.
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary"), interpret),
        interpret=tpu_interpret(interpret),
        name="ssd_chunked",
    )(*args)
    return y.transpose(0, 2, 1, 3), final
