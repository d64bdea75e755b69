"""Attention for verifying a draft tree: T_q draft tokens against the cached prefix and each other.

The T_q draft tokens of sequence b sit in the cache at slots prefix[b] .. prefix[b] + T_q - 1 (their
keys/values already written); draft token t sees the whole prefix and the draft tokens j with
`tree_mask[b, t, j]` (its ancestors and itself). A chain of drafts is the lower-triangular mask.
The Pallas paths are the kernels of `cache_attention` (GPU split-K, TPU key-block walk) with the
ancestor mask applied inside them, and take its block sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_attention
from pallas_kernels.cache_attention import use_pallas
from pallas_kernels.cache_attention.reference import check_cache_inputs, dequantize_cache, layer_of, masked_attention
from pallas_kernels.cache_attention.tpu import CacheAttentionTPUBlockSizes, attention_pallas_tpu
from pallas_kernels.cache_attention.triton import CacheAttentionBlockSizes, attention_partials_pallas, merge_partials


def _check(q, k, v, prefix_lengths, tree_mask, k_scale, v_scale):
    check_cache_inputs("tree_attention", q, k, v, k_scale, v_scale)
    batch, steps = q.shape[:2]
    if prefix_lengths.shape != (batch,):
        raise ValueError(f"tree_attention: prefix_lengths must be [{batch}], got {prefix_lengths.shape}")
    if tree_mask.shape != (batch, steps, steps):
        raise ValueError(
            f"tree_attention: tree_mask must be [B, T_q, T_q] = {(batch, steps, steps)}, got {tree_mask.shape}"
        )


def _prefix_ranges(q, prefix_lengths):
    """Every draft's key range [0, prefix) as lo, hi [B, T_q]; the draft keys come from the tree mask."""
    batch, steps = q.shape[:2]
    return (
        jnp.zeros((batch, steps), jnp.int32),
        jnp.broadcast_to(prefix_lengths.astype(jnp.int32)[:, None], (batch, steps)),
    )


def tree_attention_ref(q, k, v, prefix_lengths, tree_mask, scale=None, k_scale=None, v_scale=None):
    """q: [B, T_q, H, D]; k, v: [B, H_kv, S, D] (float, or int8 with k_scale/v_scale [B, H_kv, S]);
    prefix_lengths: [B]; tree_mask: [B, T_q, T_q] bool. Returns [B, T_q, H, D] in q's dtype (float32
    softmax). Key s is visible from draft t when s < prefix or tree_mask[t, s - prefix]."""
    _check(q, k, v, prefix_lengths, tree_mask, k_scale, v_scale)
    visible = tree_visible(prefix_lengths, tree_mask, k.shape[2])
    k, v = dequantize_cache(k, v, k_scale, v_scale, q.dtype)
    return masked_attention(q, k, v, visible, scale)


def tree_visible(prefix_lengths, tree_mask, seq: int):
    """[B, T_q, S] bool: key s is visible from draft t when s < prefix or tree_mask[t, s - prefix]."""
    steps = tree_mask.shape[1]
    s = jnp.arange(seq)[None, None, :]
    rel = s - prefix_lengths[:, None, None]  # [B, 1, S]: index among the drafts
    in_tree = (rel >= 0) & (rel < steps)
    allowed = jnp.take_along_axis(
        tree_mask, jnp.broadcast_to(jnp.clip(rel, 0, steps - 1), (tree_mask.shape[0], steps, seq)), axis=2
    )
    return (rel < 0) | (in_tree & allowed)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def tree_attention_pallas(
    q,
    k,
    v,
    prefix_lengths,
    tree_mask,
    scale=None,
    k_scale=None,
    v_scale=None,
    *,
    block_sizes: CacheAttentionBlockSizes | None = None,
    interpret: bool = False,
):
    """Pallas version of `tree_attention_ref` (same contract): `cache_attention`'s split-K kernel."""
    _check(q, k, v, prefix_lengths, tree_mask, k_scale, v_scale)
    blocks = CacheAttentionBlockSizes.resolve(block_sizes, "tree_attention")
    lo, hi = _prefix_ranges(q, prefix_lengths)
    o, m, denom = attention_partials_pallas(
        q, k, v, lo, hi, scale, k_scale, v_scale, prefix_lengths, tree_mask, blocks=blocks, interpret=interpret
    )
    return merge_partials(o, m, denom, q.shape[1], q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def tree_attention_pallas_tpu(
    q,
    k,
    v,
    prefix_lengths,
    tree_mask,
    scale=None,
    k_scale=None,
    v_scale=None,
    *,
    block_sizes: CacheAttentionTPUBlockSizes | None = None,
    interpret: bool = False,
):
    """TPU (Mosaic) version of `tree_attention_ref` (same contract): `attention_pallas_tpu` with the
    prefix as every query's key range and the ancestor mask over the draft keys."""
    _check(q, k, v, prefix_lengths, tree_mask, k_scale, v_scale)
    blocks = CacheAttentionTPUBlockSizes.resolve(block_sizes, "tree_attention")
    lo, hi = _prefix_ranges(q, prefix_lengths)
    return attention_pallas_tpu(
        q, k, v, lo, hi, scale, k_scale, v_scale, prefix_lengths, tree_mask, blocks=blocks, interpret=interpret
    )


def tree_attention(
    q,
    k,
    v,
    prefix_lengths,
    tree_mask,
    scale=None,
    k_scale=None,
    v_scale=None,
    *,
    block_sizes: CacheAttentionBlockSizes | CacheAttentionTPUBlockSizes | None = None,
    layer=None,
    impl="auto",
):
    """Dispatcher for `tree_attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    `block_sizes` are those of the kernel that runs (None: its defaults). With `layer` (an int32 scalar), k and v
    (and the scales) are every layer's cache [L, ...] and layer `layer` is attended: the CPU kernel
    (`pallas_kernels.cpu_attention`, which "auto" takes on CPU where it applies) reads it in place and gives each
    node the bits of the same token decoded alone after its ancestors."""
    if impl == "auto" and cpu_attention.applies(q, k, k_scale):
        _check(q, k if layer is None else k[0], v if layer is None else v[0], prefix_lengths, tree_mask, None, None)
        visible = tree_visible(prefix_lengths, tree_mask, k.shape[-2])
        return cpu_attention.masked_attention(q, k, v, visible, scale, layer=layer).astype(q.dtype)
    k, v, k_scale, v_scale = layer_of(layer, k, v, k_scale, v_scale)
    kind = use_pallas(impl, "tree_attention", q.shape[-1])
    if kind == "xla":
        return tree_attention_ref(q, k, v, prefix_lengths, tree_mask, scale, k_scale, v_scale)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return tree_attention_pallas_tpu(
            q, k, v, prefix_lengths, tree_mask, scale, k_scale, v_scale, block_sizes=block_sizes
        )
    return tree_attention_pallas(
        q,
        k,
        v,
        prefix_lengths,
        tree_mask,
        scale,
        k_scale,
        v_scale,
        block_sizes=block_sizes,
        interpret=kind == "interpret",
    )
