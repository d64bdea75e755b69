"""Causal self-attention of a prefill: T new tokens at positions 0..T-1 of each sequence.

GQA without repeating K/V, right-padded ragged batches (`lengths`), optional sliding window. The
reference processes queries in blocks and gives each block only the keys up to its last position, so
the masked upper triangle is mostly skipped (about half the work of a dense causal attention). The
Pallas kernel is a flash attention: one program per (sequence, head, block of queries) walks over the
key blocks its queries can see, keeping an online softmax (running max, sum and output) in float32 on
chip; K/V blocks are read straight from the kv head `h // (H / H_kv)`, never repeated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.lowering import is_power_of_two, tpu_interpret, tpu_params, triton_params
from pallas_kernels.online_softmax import initial_state, online_softmax_step, scratch_init, scratch_output, scratch_step

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
DEFAULT_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class FlashAttentionBlockSizes(BlockSizes):
    """(queries, keys) per block of `flash_attention_pallas` (powers of two, >= 16 for Triton's dot), and
    its Triton launch parameters. Measured on an H200 (Llama-3-8B shapes, b4 t2048, bf16;
    experiments/results/gpu_h200/run2): 64 x 64 with 3 stages 644 us, 2 stages 699 us, 4 stages 983 us;
    128 x 64 806 us, 64 x 128 1017 us, 128 x 128 with 8 warps 737 us."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_q", "block_k", least=16)


@dataclasses.dataclass(frozen=True)
class FlashAttentionTPUBlockSizes(BlockSizes):
    """Query and key block (rows of T) of `flash_attention_pallas_tpu`: a multiple of 16 (bf16 sublane tile)."""

    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        self._multiples(16, "block")


def _check(q, k, v, lengths):
    batch, steps, heads, _ = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"flash_attention: query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if k.shape != v.shape or k.shape[:2] != (batch, steps) or k.shape[3] != q.shape[3]:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must be [B, T, H_kv, D] matching q {q.shape}")
    if lengths is not None and lengths.shape != (batch,):
        raise ValueError(f"flash_attention: lengths must be [{batch}], got {lengths.shape}")


def flash_attention_ref(q, k, v, window=0, scale=None, lengths=None, block: int = DEFAULT_BLOCK):
    """q: [B, T, H, D]; k, v: [B, T, H_kv, D] -> [B, T, H, D] in q's dtype (float32 softmax).

    Query t of sequence b sees keys s with s <= t, s < lengths[b] (None: T) and (window == 0 or
    s > t - window); `window` and `lengths` may be traced. Right-padded rows t >= lengths[b] thus see
    only the real keys, and a row that sees no key at all (lengths[b] == 0) is zero.
    """
    _check(q, k, v, lengths)
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    qg = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    outs = []
    for start in range(0, steps, block):
        stop = min(start + block, steps)
        scores = (
            jnp.einsum("btkgd,bskd->bkgts", qg[:, start:stop], k[:, :stop], preferred_element_type=jnp.float32) * scale
        )
        t = jnp.arange(start, stop)[:, None]
        s = jnp.arange(stop)[None, :]
        visible = (s <= t) & ((window <= 0) | (s > t - window)) & (s < lengths[:, None, None])  # [b, t, s]
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        # Softmax with the normalisation applied after the value product: one pass less over scores.
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum(
            "bkgts,bskd->bkgtd", weights.astype(v.dtype), v[:, :stop], preferred_element_type=jnp.float32
        )  # [b,k,g,t,d]: one batched matmul on CPU
        out = out / jnp.sum(weights, axis=-1)[..., None]
        out = jnp.where(jnp.any(visible, axis=-1)[:, None, None, :, None], out, 0.0)
        outs.append(out.transpose(0, 3, 1, 2, 4))
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return out.reshape(batch, steps, heads, dim).astype(q.dtype)


def _flash_kernel(length_ref, window_ref, q_ref, k_ref, v_ref, o_ref, *, scale, block_q, block_k, steps):
    """One (sequence, head, query block) program. q_ref/o_ref: [T, D] of this head; k_ref/v_ref:
    [T, D] of its kv head; length_ref: [1] real tokens of the sequence; window_ref: [1]."""
    dim = q_ref.shape[-1]
    first = pl.program_id(2) * block_q
    rows = first + jnp.arange(block_q)
    row_ok = rows < steps
    q = plgpu.load(q_ref.at[pl.ds(first, block_q), :], mask=row_ok[:, None], other=0.0)
    q = (q.astype(jnp.float32) * scale).astype(q_ref.dtype)
    length, window = jnp.sum(length_ref[...]), jnp.sum(window_ref[...])
    # Key blocks that any query of this block can see: from the window's start to the last query
    # (or the sequence's end, if earlier).
    lo = jnp.where(window > 0, jnp.maximum(first - window + 1, 0), 0) // block_k
    hi = pl.cdiv(jnp.minimum(jnp.minimum(first + block_q, steps), length), block_k)

    def body(j, carry):
        cols = j * block_k + jnp.arange(block_k)
        col_ok = cols < steps
        k = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :], mask=col_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(j * block_k, block_k), :], mask=col_ok[:, None], other=0.0)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        visible = (
            (cols[None, :] <= rows[:, None])
            & (cols[None, :] < length)
            & ((window <= 0) | (cols[None, :] > rows[:, None] - window))
        )
        return online_softmax_step(*carry, s, visible, v)

    acc, _, denom = jax.lax.fori_loop(lo, hi, body, initial_state(block_q, dim))
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
    plgpu.store(o_ref.at[pl.ds(first, block_q), :], out.astype(o_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def flash_attention_pallas(
    q,
    k,
    v,
    window=0,
    scale=None,
    lengths=None,
    *,
    block_sizes: FlashAttentionBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `flash_attention_ref` (same contract). head_dim must be a power of two >= 16."""
    _check(q, k, v, lengths)
    blocks = FlashAttentionBlockSizes.resolve(block_sizes, "flash_attention")
    batch, steps, heads, dim = q.shape
    rep = heads // k.shape[2]
    if not (is_power_of_two(dim) and dim >= 16):
        raise ValueError(f"flash_attention: the Pallas kernel needs a power-of-two head_dim >= 16, got {dim}")
    block_q, block_k = blocks.block_q, blocks.block_k
    scale = dim**-0.5 if scale is None else scale
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32).reshape(1)
    per_head = pl.BlockSpec((None, steps, None, dim), lambda b, h, i: (b, 0, h, 0))
    per_kv_head = pl.BlockSpec((None, steps, None, dim), lambda b, h, i: (b, 0, h // rep, 0))
    return pl.pallas_call(
        functools.partial(_flash_kernel, scale=scale, block_q=block_q, block_k=block_k, steps=steps),
        grid=(batch, heads, pl.cdiv(steps, block_q)),
        in_specs=[
            pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)),
            pl.BlockSpec((1,), lambda b, h, i: (0,)),
            per_head,
            per_kv_head,
            per_kv_head,
        ],
        out_specs=per_head,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(lengths[:, None], window, q, k, v)


def _visible_key_blocks(first, length, window, block):
    """[lo, hi): the key blocks that some query of the block starting at `first` can see."""
    # lax.div truncates (= floor on these non-negative values), sparing `//`'s sign fix-up in Mosaic.
    lo = jax.lax.div(jnp.where(window > 0, jnp.maximum(first - window + 1, 0), 0), block)
    return lo, pl.cdiv(jnp.minimum(first + block, length), block)


def _flash_kernel_tpu(lengths_ref, window_ref, q_ref, k_ref, v_ref, o_ref, m_ref, denom_ref, acc_ref, *, scale):
    """One (sequence, head, query block, key block) step. q_ref/o_ref: [block, D]; k_ref/v_ref:
    [block, D] of the kv head; lengths_ref: [B], window_ref: [1] (SMEM); scratch m_ref/denom_ref:
    [block, 128] running max / sum (replicated over lanes), acc_ref: [block, D] running output."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block = q_ref.shape[0]
    length, window = lengths_ref[b], window_ref[0]
    lo, hi = _visible_key_blocks(i * block, length, window, block)

    @pl.when(j == 0)
    def _init():
        scratch_init(m_ref, denom_ref, acc_ref)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        s = (
            jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * scale
        )
        rows = i * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = j * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = (cols <= rows) & (cols < length) & ((window <= 0) | (cols > rows - window))
        p, alpha = scratch_step(m_ref, denom_ref, s, visible)
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(
            p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = scratch_output(denom_ref, acc_ref).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def flash_attention_pallas_tpu(
    q,
    k,
    v,
    window=0,
    scale=None,
    lengths=None,
    *,
    block_sizes: FlashAttentionTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU version of `flash_attention_ref` (same contract; any head_dim).

    Heads move before time (q: [B, H, T, D], k/v: [B, H_kv, T, D]) and T is zero-padded to a multiple
    of the block (`block_sizes.block`, capped at T rounded up to 16), so every block is a [block, D] tile.
    Grid (B, H, query blocks, key blocks), the key axis sequential with the online softmax in VMEM
    scratch; K/V blocks come from kv head h // (H / H_kv), never repeated. Key blocks no query of the
    block can see are skipped, and their index map repeats a visible block so they are not fetched.
    """
    _check(q, k, v, lengths)
    blocks = FlashAttentionTPUBlockSizes.resolve(block_sizes, "flash_attention")
    batch, steps, heads, dim = q.shape
    rep = heads // k.shape[2]
    block = min(blocks.block, pl.cdiv(steps, 16) * 16)
    padded = pl.cdiv(steps, block) * block
    scale = dim**-0.5 if scale is None else scale
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32).reshape(1)
    q, k, v = (jnp.pad(x, ((0, 0), (0, padded - steps), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q, k, v))

    def kv_index(b, h, i, j, lengths_ref, window_ref):
        lo, hi = _visible_key_blocks(i * block, lengths_ref[b], window_ref[0], block)
        return b, jax.lax.div(h, rep), jnp.maximum(lo, jnp.minimum(j, hi - 1)), 0

    per_head = pl.BlockSpec((None, None, block, dim), lambda b, h, i, j, *_: (b, h, i, 0))
    per_kv_head = pl.BlockSpec((None, None, block, dim), kv_index)
    out = pl.pallas_call(
        functools.partial(_flash_kernel_tpu, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, padded // block, padded // block),
            in_specs=[per_head, per_kv_head, per_kv_head],
            out_specs=per_head,
            scratch_shapes=[
                pltpu.VMEM((block, 128), jnp.float32),
                pltpu.VMEM((block, 128), jnp.float32),
                pltpu.VMEM((block, dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, heads, padded, dim), q.dtype),
        # (batch, head, query block, key block): the key axis carries the online softmax in scratch.
        compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary"), interpret),
        interpret=tpu_interpret(interpret),
        name="flash_attention_tpu",
    )(lengths, window, q, k, v)
    return out[:, :, :steps].transpose(0, 2, 1, 3)


def flash_attention(
    q,
    k,
    v,
    window=0,
    scale=None,
    lengths=None,
    *,
    block_sizes: FlashAttentionBlockSizes | FlashAttentionTPUBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `flash_attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    The GPU kernel needs a power-of-two head_dim >= 16: otherwise "auto" uses the reference there
    (the TPU kernel takes any head_dim). `block_sizes` are those of the kernel that runs (None: its
    defaults)."""
    kind = resolve_impl(impl, "flash_attention", PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return flash_attention_pallas_tpu(q, k, v, window, scale, lengths, block_sizes=block_sizes)
    dim = q.shape[-1]
    if kind == "pallas" and impl == "auto" and not (is_power_of_two(dim) and dim >= 16):
        kind = "xla"
    if kind == "xla":
        return flash_attention_ref(q, k, v, window, scale, lengths)
    return flash_attention_pallas(
        q, k, v, window, scale, lengths, block_sizes=block_sizes, interpret=kind == "interpret"
    )
