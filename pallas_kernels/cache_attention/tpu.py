"""Attention over a KV cache for Mosaic TPU: a walk over key blocks along an "arbitrary" grid axis with
the online softmax in VMEM scratch; it takes the optional draft-tree mask too, so it serves both
`cache_attention` and `tree_attention`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.cache_attention.reference import check_cache_inputs, key_ranges
from pallas_kernels.lowering import tpu_interpret, tpu_params
from pallas_kernels.online_softmax import scratch_init, scratch_output, scratch_step


@dataclasses.dataclass(frozen=True)
class CacheAttentionTPUBlockSizes(BlockSizes):
    """`attention_pallas_tpu` (cache and tree attention): keys per K/V block (a multiple of 128; all of S
    when shorter) and most query rows (T x group) per program (a multiple of 16), bounding VMEM: 512 x 128
    float32 acc and 512 x 128 K/V blocks, double-buffered."""

    block_k: int = 512
    max_rows: int = 512

    def __post_init__(self):
        super().__post_init__()
        self._multiples(128, "block_k")
        self._multiples(16, "max_rows")


def _cache_attention_tpu_kernel(blk_lo_ref, blk_hi_ref, *refs, scale, block_k, seq, quantized, tree):
    """One (sequence, kv head, row block, key block) step; scalar prefetch blk_lo/blk_hi [B*row_blocks]
    (key blocks this row block needs) and with a tree its prefix [B]; lo/hi [rb, 1] key range per row,
    q [rb, D], k/v [bk, D] (+ scales [1, bk]), with a tree its mask [rb, T_pad]; output o [rb, D];
    scratch m, denom [rb, 1] and acc [rb, D] float32."""
    prefix_ref, *refs = refs if tree else (None, *refs)
    lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs = refs
    ks_ref, vs_ref, *refs = refs if quantized else (None, None, *refs)
    tree_ref, *refs = refs if tree else (None, *refs)
    o_ref, m_ref, denom_ref, acc_ref = refs
    b, r, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    slot = b * pl.num_programs(2) + r

    @pl.when(j == 0)
    def _init():
        scratch_init(m_ref, denom_ref, acc_ref)

    def step(tree_block):
        q = q_ref[...]
        k, v = k_ref[...], v_ref[...]
        if quantized:  # int8 crosses HBM; the per-key scales apply to score and probability columns
            k, v = k.astype(jnp.float32).astype(q.dtype), v.astype(jnp.float32).astype(q.dtype)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * (scale * ks_ref[...] if quantized else scale)
        cols = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        visible = (cols >= lo_ref[...]) & (cols < hi_ref[...])
        if tree_block:  # keys prefix + t: a one-hot matmul gathers mask column t for each key (no lane gather)
            hit = jax.lax.broadcasted_iota(jnp.int32, (tree_ref.shape[1], block_k), 0) == cols - prefix_ref[b]
            allowed = jnp.dot(tree_ref[...], hit.astype(tree_ref.dtype), preferred_element_type=jnp.float32)
            visible = visible | ((allowed > 0) & (cols < seq))
        p, alpha = scratch_step(m_ref, denom_ref, s, visible)
        if quantized:  # where, not a product: scales past S in a partial last block are garbage
            p = jnp.where(visible, p * vs_ref[...], 0.0)
        elif seq % block_k:  # a partial last block reads garbage past S: 0 * NaN would poison acc
            keys = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v = jnp.where(keys < seq, v, jnp.zeros_like(v))
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    needed = (j >= blk_lo_ref[slot]) & (j < blk_hi_ref[slot])
    if tree:  # only the key blocks overlapping the draft keys pay for the mask matmul
        start = j * block_k - prefix_ref[b]
        tree_block = (start < tree_ref.shape[1]) & (start + block_k > 0)
        pl.when(needed & tree_block)(functools.partial(step, True))
        pl.when(needed & jnp.logical_not(tree_block))(functools.partial(step, False))
    else:
        pl.when(needed)(functools.partial(step, False))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        o_ref[...] = scratch_output(denom_ref, acc_ref).astype(o_ref.dtype)


def attention_pallas_tpu(
    q,
    k,
    v,
    lo,
    hi,
    scale,
    k_scale,
    v_scale,
    tree_prefix,
    tree_mask,
    *,
    blocks: CacheAttentionTPUBlockSizes,
    interpret: bool,
):
    """TPU (Mosaic) attention over the cache. q: [B, T, H, D]; k, v: [B, H_kv, S, D] (int8 with scales
    [B, H_kv, S]); lo, hi: [B, T] visible key range per query; optionally tree_prefix: [B] and tree_mask:
    [B, T, T_tree] bool (query t also sees key tree_prefix + j where tree_mask[b, t, j]). Returns
    [B, T, H, D] in q's dtype; a query that sees no key gives zeros.

    Grid (B, H_kv, row blocks, key blocks), key axis "arbitrary": each program holds the T*G query rows
    of one kv head (padded to the sublane tile) in VMEM with the online softmax (m, denom, acc) in VMEM
    scratch, and streams K/V (int8 dequantized in the kernel) in blocks of `block_k` keys. Per row block,
    the range of key blocks its rows can see (key ranges and draft keys) is scalar-prefetched: blocks
    outside it are skipped and their index_map repeats a needed block, so they are never DMAed. S need
    not be a multiple of the block: the partial last block is masked, K/V are never copied. The tree
    mask (rows padded like q, T_tree padded to 128 lanes) stays in VMEM for the whole key walk.
    """
    batch, steps, heads, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = steps * group
    sublanes = 32 // jnp.dtype(q.dtype).itemsize  # a (sublanes, 128) tile: 8 rows for f32, 16 for bf16
    row_block = min(blocks.max_rows, pl.cdiv(rows, sublanes) * sublanes)
    row_blocks = pl.cdiv(rows, row_block)
    padded = row_blocks * row_block
    block_k = min(blocks.block_k, seq)  # a multiple of 128, or all of S
    key_blocks = pl.cdiv(seq, block_k)
    scale = dim**-0.5 if scale is None else scale
    tree = tree_mask is not None

    hi = jnp.minimum(hi, seq)  # keys past S do not exist (and a partial last block holds garbage there)
    pad_rows = lambda a, fill: jnp.pad(  # noqa: E731  [B, T] -> [B, padded] in (t, g) row order
        jnp.repeat(a, group, axis=1), ((0, 0), (0, padded - rows)), constant_values=fill
    )
    lo_rows, hi_rows = pad_rows(lo, 0), pad_rows(hi, 0)  # padding rows see nothing
    nonempty = (lo_rows < hi_rows).reshape(batch * row_blocks, row_block)
    first_key = jnp.min(jnp.where(nonempty, lo_rows.reshape(nonempty.shape), seq), axis=1)
    last_key = jnp.max(jnp.where(nonempty, hi_rows.reshape(nonempty.shape), 0), axis=1)
    if tree:  # every row block may see the draft keys that exist: prefix .. prefix + T_tree - 1 (< S)
        prefix = tree_prefix.astype(jnp.int32)
        tree_lo, tree_hi = jnp.clip(prefix, 0, seq), jnp.clip(prefix + tree_mask.shape[-1], 0, seq)
        has_tree = jnp.repeat(tree_lo < tree_hi, row_blocks)
        first_key = jnp.where(has_tree, jnp.minimum(first_key, jnp.repeat(tree_lo, row_blocks)), first_key)
        last_key = jnp.where(has_tree, jnp.maximum(last_key, jnp.repeat(tree_hi, row_blocks)), last_key)
    blk_lo = jnp.where(last_key > 0, first_key // block_k, 0).astype(jnp.int32)
    blk_hi = pl.cdiv(last_key, block_k).astype(jnp.int32)
    qr = q.reshape(batch, steps, kv_heads, group, dim).transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, dim)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))

    def key_block(b, r, j, blk_lo_ref, blk_hi_ref, *_):
        """Clamp j into the needed blocks: a skipped step re-uses the resident block (no DMA)."""
        slot = b * row_blocks + r
        return jnp.clip(j, blk_lo_ref[slot], jnp.maximum(blk_hi_ref[slot] - 1, blk_lo_ref[slot]))

    rows_spec = pl.BlockSpec((None, row_block, 1), lambda b, h, r, j, *_: (b, r, 0))
    q_spec = pl.BlockSpec((None, None, row_block, dim), lambda b, h, r, j, *_: (b, h, r, 0))
    cache_spec = pl.BlockSpec((None, None, block_k, dim), lambda b, h, r, j, *p: (b, h, key_block(b, r, j, *p), 0))
    # scales as [B, H_kv, 1, S] (a free reshape): (1, block_k) blocks are row vectors over the keys
    scale_spec = pl.BlockSpec((None, None, 1, block_k), lambda b, h, r, j, *p: (b, h, 0, key_block(b, r, j, *p)))
    in_specs = [rows_spec, rows_spec, q_spec, cache_spec, cache_spec]
    args = [lo_rows[..., None], hi_rows[..., None], qr, k, v]
    quantized = k_scale is not None
    if quantized:
        in_specs += [scale_spec, scale_spec]
        args += [s.astype(jnp.float32).reshape(batch, kv_heads, 1, seq) for s in (k_scale, v_scale)]
    prefetch = [blk_lo, blk_hi]
    if tree:  # 0/1 in q's dtype (the matmul operand), rows as q's, T_tree padded to whole lanes
        tree_pad = pl.cdiv(tree_mask.shape[-1], 128) * 128
        mask_rows = jnp.repeat(tree_mask.astype(q.dtype), group, axis=1)
        in_specs.append(pl.BlockSpec((None, row_block, tree_pad), lambda b, h, r, j, *_: (b, r, 0)))
        args.append(jnp.pad(mask_rows, ((0, 0), (0, padded - rows), (0, tree_pad - tree_mask.shape[-1]))))
        prefetch.append(prefix)
    kernel = functools.partial(
        _cache_attention_tpu_kernel, scale=scale, block_k=block_k, seq=seq, quantized=quantized, tree=tree
    )
    name = "tree_attention" if tree else "cache_attention"
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, kv_heads, row_blocks, key_blocks),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((row_block, 1), jnp.float32),
                pltpu.VMEM((row_block, 1), jnp.float32),
                pltpu.VMEM((row_block, dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        # (sequence, kv head, row block, key block): the key axis carries the online softmax in scratch.
        compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary"), interpret),
        interpret=tpu_interpret(interpret),
        name=f"{name}_tpu",
    )(*prefetch, *args)
    out = out[:, :, :rows].reshape(batch, kv_heads, steps, group, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, steps, heads, dim)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def cache_attention_pallas_tpu(
    q,
    k,
    v,
    q_positions,
    kv_lengths,
    window=0,
    scale=None,
    k_scale=None,
    v_scale=None,
    *,
    block_sizes: CacheAttentionTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """TPU (Mosaic) version of `cache_attention_ref` (same contract); see `attention_pallas_tpu`."""
    check_cache_inputs("cache_attention", q, k, v, k_scale, v_scale)
    blocks = CacheAttentionTPUBlockSizes.resolve(block_sizes, "cache_attention")
    lo, hi = key_ranges(q_positions, kv_lengths, window)
    return attention_pallas_tpu(
        q, k, v, lo, hi, scale, k_scale, v_scale, None, None, blocks=blocks, interpret=interpret
    )
