"""Mamba-2 SSD kernels for the Pallas Triton lowering (GPU): the fused chunked scan and the decode step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.lowering import triton_params
from pallas_kernels.ssd.reference import check_chunk_size, check_inputs, check_step_inputs
from pallas_kernels.state_update import state_update_kernel


@dataclasses.dataclass(frozen=True)
class SSDChunkedBlockSizes(BlockSizes):
    """Steps per chunk (at most) and head channels per program of `ssd_chunked_pallas` (powers of two,
    >= 16 for Triton's dot), and its Triton launch parameters. Measured on an H200 (a Mamba-2-2.7B layer,
    b2 t4096, 80 heads of 64, N 128; experiments/results/gpu_h200/run2): 4 warps 838 us, 8 warps 1277 us;
    with 8 warps, chunk 128 1656 us, block_p 64 1360 us, block_p 16 1528 us."""

    chunk: int = 64
    block_p: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("chunk", "block_p", least=16)


@functools.partial(jax.jit, static_argnames=("interpret",))
def ssd_step_pallas(state, x, dt, A, B, C, D=None, *, interpret: bool = False):
    """Pallas version of `ssd_step_ref` (same contract): one program per (sequence, head) keeps that
    head's [P, N] state on chip; the state is updated in place (its buffer is aliased to the output)."""
    check_step_inputs(state, x, dt, A, B, C, D)
    batch, heads, head_dim, n = state.shape
    rep = heads // B.shape[1]
    D = jnp.zeros((heads,), jnp.float32) if D is None else D
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda b, h: (b, h) + (0,) * len(block))  # noqa: E731
    per_group = pl.BlockSpec((None, None, n), lambda b, h: (b, h // rep, 0))
    head_scalar = pl.BlockSpec((None, 1), lambda b, h: (h, 0))
    return pl.pallas_call(
        functools.partial(state_update_kernel, gate=False),
        grid=(batch, heads),
        in_specs=[
            per_head(head_dim, n),
            per_head(head_dim),
            per_head(1),
            head_scalar,
            per_group,
            per_group,
            head_scalar,
        ],
        out_specs=[per_head(head_dim), per_head(head_dim, n)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=triton_params(interpret, num_warps=4, num_stages=1),
        interpret=interpret,
        name="ssd_step",
    )(state, x, dt[..., None], A[:, None], B, C, D[:, None])


def _ssd_chunked_kernel(
    x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, *refs, steps: int, head_dim: int, n: int, chunk: int, has_state: bool
):
    """One (sequence, head, channel block) program. Refs: x/y [T, BP], dt [T], A/D [1], B/C [T, BN] of the
    head's group, state/final [BP, BN], with BP, BN powers of two >= 16 (masked beyond P, N and T)."""
    state_ref, y_ref, final_ref = refs if has_state else (None, *refs)
    f32 = jnp.float32
    block_p, block_n = final_ref.shape
    p_ok = pl.program_id(2) * block_p + jnp.arange(block_p) < head_dim
    n_ok = jnp.arange(block_n) < n
    state_mask = p_ok[:, None] & n_ok[None, :]
    step = jnp.arange(chunk)
    causal = step[:, None] >= step[None, :]
    A, D = A_ref[...].astype(f32), D_ref[...].astype(f32)
    # Default precision, as the reference's einsums: TF32 for float32 on recent GPUs unless
    # `jax_default_matmul_precision` asks for more.
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=f32)
    state = (
        plgpu.load(state_ref, mask=state_mask, other=0.0).astype(f32)
        if has_state
        else jnp.zeros((block_p, block_n), f32)
    )

    def one_chunk(c, state):  # state: [BP, BN] entering chunk c
        rows = pl.ds(c * chunk, chunk)
        t_ok = c * chunk + step < steps
        # Steps beyond T load dt = 0 and x = B = C = 0, so they leave the state unchanged.
        x = plgpu.load(x_ref.at[rows, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0).astype(f32)
        dt = plgpu.load(dt_ref.at[rows], mask=t_ok, other=0.0).astype(f32)
        B = plgpu.load(B_ref.at[rows, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        C = plgpu.load(C_ref.at[rows, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        a = dt * A
        cum = jnp.cumsum(a)  # [L], inclusive
        total = jnp.sum(a)
        # Within the chunk: y[l] = sum_{s <= l} (C[l] . B[s]) exp(cum[l] - cum[s]) dt[s] x[s]; the -inf above
        # the diagonal keeps exp from overflowing there. Differences of prefix sums (as Mamba's GPU kernels),
        # not the reference's direct segment sums: an [L, L, L] sum would not fit on chip.
        # C B^T in the input dtype: its products are exact.
        decay = jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))
        scores = dot(C, B, (((1,), (1,)), ((), ())))  # [L, L]
        y = dot(scores * decay * dt[None, :], x, (((1,), (0,)), ((), ())))
        # The entering state read out by C, decayed to each step; plus the skip connection.
        y += dot(C.astype(f32), state, (((1,), (1,)), ((), ()))) * jnp.exp(cum)[:, None] + D * x
        plgpu.store(y_ref.at[rows, :], y.astype(y_ref.dtype), mask=t_ok[:, None] & p_ok[None, :])
        # The state at the chunk's end: decayed entering state plus each step's input decayed to the end.
        to_end = dt * jnp.exp(total - cum)  # [L]
        return state * jnp.exp(total) + dot(x, B.astype(f32) * to_end[:, None], (((0,), (0,)), ((), ())))

    state = jax.lax.fori_loop(0, pl.cdiv(steps, chunk), one_chunk, state)
    plgpu.store(final_ref, state, mask=state_mask)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_sizes", "interpret"))
def ssd_chunked_pallas(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    state=None,
    chunk_size: int = 256,
    *,
    block_sizes: SSDChunkedBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `ssd_chunked_ref` (same contract, any sizes). Grid (sequence, head, blocks of BP
    head channels); each program loops over chunks of L steps keeping its [BP, N] state on chip, reading
    its head group's B/C rows. `chunk_size` is validated but, as the result does not depend on it, the
    kernel uses its own L: the next power of two >= T, between 16 and `block_sizes.chunk`. P and N are
    padded on chip to powers of two >= 16 (Triton's dot minimum) by masked loads and stores."""
    check_inputs(x, dt, A, B, C, D, state)
    check_chunk_size(chunk_size)
    blocks = SSDChunkedBlockSizes.resolve(block_sizes, "ssd_chunked")
    batch, steps, heads, head_dim = x.shape
    n = B.shape[3]
    rep = heads // B.shape[2]
    chunk = min(blocks.chunk, max(16, pl.next_power_of_2(steps)))
    block_p = min(blocks.block_p, max(16, pl.next_power_of_2(head_dim)))
    block_n = max(16, pl.next_power_of_2(n))
    D = jnp.zeros((heads,), jnp.float32) if D is None else D
    head_scalar = pl.BlockSpec((None, 1), lambda b, h, p: (h, 0))
    group_rows = pl.BlockSpec((None, steps, None, block_n), lambda b, h, p: (b, 0, h // rep, 0))
    head_rows = pl.BlockSpec((None, steps, None, block_p), lambda b, h, p: (b, 0, h, p))
    state_block = pl.BlockSpec((None, None, block_p, block_n), lambda b, h, p: (b, h, p, 0))
    in_specs = [
        head_rows,
        pl.BlockSpec((None, steps, None), lambda b, h, p: (b, 0, h)),
        head_scalar,
        group_rows,
        group_rows,
        head_scalar,
    ]
    args = [x, dt, A[:, None], B, C, D[:, None]]
    if state is not None:  # no zero state is read from memory when there is none
        in_specs.append(state_block)
        args.append(state)
    kernel = functools.partial(
        _ssd_chunked_kernel, steps=steps, head_dim=head_dim, n=n, chunk=chunk, has_state=state is not None
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, pl.cdiv(head_dim, block_p)),
        in_specs=in_specs,
        out_specs=[head_rows, state_block],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, heads, head_dim, n), jnp.float32),
        ],
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="ssd_chunked",
    )(*args)
