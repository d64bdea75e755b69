"""Causal self-attention of a prefill: T new tokens at positions 0..T-1 of each sequence.

GQA without repeating K/V, right-padded ragged batches (`lengths`), optional sliding window. The
reference processes queries in blocks and gives each block only the keys up to its last position, so
the masked upper triangle is mostly skipped (about half the work of a dense causal attention). The
Pallas kernel is a flash attention: one program per (sequence, head, block of queries) walks over the
key blocks its queries can see, keeping an online softmax (running max, sum and output) in float32 on
chip; K/V blocks are read straight from the kv head `h // (H / H_kv)`, never repeated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.gpu_params import FLASH_ATTENTION_BLOCKS, compiler_params, is_power_of_two

PALLAS_BACKENDS: tuple[str, ...] = ("gpu",)
DEFAULT_BLOCK = 128
_NEG = -1e30  # finite "minus infinity": rows that see no key give exp(_NEG - _NEG) masked to 0, not NaN


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
    scale = dim ** -0.5 if scale is None else scale
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    qg = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    outs = []
    for start in range(0, steps, block):
        stop = min(start + block, steps)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg[:, start:stop], k[:, :stop],
                            preferred_element_type=jnp.float32) * scale
        t = jnp.arange(start, stop)[:, None]
        s = jnp.arange(stop)[None, :]
        visible = (s <= t) & ((window <= 0) | (s > t - window)) & (s < lengths[:, None, None])  # [b, t, s]
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        # Softmax with the normalisation applied after the value product: one pass less over scores.
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum("bkgts,bskd->bkgtd", weights.astype(v.dtype), v[:, :stop],
                         preferred_element_type=jnp.float32)  # [b,k,g,t,d]: one batched matmul on CPU
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
        acc, m, l = carry
        cols = j * block_k + jnp.arange(block_k)
        col_ok = cols < steps
        k = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :], mask=col_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(j * block_k, block_k), :], mask=col_ok[:, None], other=0.0)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < length) \
            & ((window <= 0) | (cols[None, :] > rows[:, None] - window))
        s = jnp.where(visible, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_q, dim), jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(lo, hi, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    plgpu.store(o_ref.at[pl.ds(first, block_q), :], out.astype(o_ref.dtype), mask=row_ok[:, None])


def flash_attention_pallas(q, k, v, window=0, scale=None, lengths=None, *, interpret: bool = False):
    """Pallas version of `flash_attention_ref` (same contract). head_dim must be a power of two >= 16."""
    _check(q, k, v, lengths)
    batch, steps, heads, dim = q.shape
    rep = heads // k.shape[2]
    if not (is_power_of_two(dim) and dim >= 16):
        raise ValueError(f"flash_attention: the Pallas kernel needs a power-of-two head_dim >= 16, got {dim}")
    block_q, block_k = FLASH_ATTENTION_BLOCKS
    scale = dim ** -0.5 if scale is None else scale
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32).reshape(1)
    per_head = pl.BlockSpec((None, steps, None, dim), lambda b, h, i: (b, 0, h, 0))
    per_kv_head = pl.BlockSpec((None, steps, None, dim), lambda b, h, i: (b, 0, h // rep, 0))
    return pl.pallas_call(
        functools.partial(_flash_kernel, scale=scale, block_q=block_q, block_k=block_k, steps=steps),
        grid=(batch, heads, pl.cdiv(steps, block_q)),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h, i: (b, 0)), pl.BlockSpec((1,), lambda b, h, i: (0,)),
                  per_head, per_kv_head, per_kv_head],
        out_specs=per_head,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params("flash_attention", interpret),
        interpret=interpret,
        name="flash_attention",
    )(lengths[:, None], window, q, k, v)


def flash_attention(q, k, v, window=0, scale=None, lengths=None, *, impl="auto"):
    """Dispatcher for `flash_attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    The Pallas kernel needs a power-of-two head_dim >= 16: otherwise "auto" uses the reference."""
    kind = resolve_impl(impl, "flash_attention", PALLAS_BACKENDS)
    dim = q.shape[-1]
    if kind == "pallas" and impl == "auto" and not (is_power_of_two(dim) and dim >= 16):
        kind = "xla"
    if kind == "xla":
        return flash_attention_ref(q, k, v, window, scale, lengths)
    return flash_attention_pallas(q, k, v, window, scale, lengths, interpret=kind == "interpret")
