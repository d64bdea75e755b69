"""Tree verification for attention models: score draft-tree nodes in one forward, keep the accepted path.

The tree's nodes are written into the cache's free slots: node i of row b at slot `lengths[b] + i`,
rotated to position `lengths[b] + depth(i)` (its place in the text if it is accepted). A node attends
to the committed prefix (slots < lengths[b]) and to its ancestors and itself (`tree.ancestor_mask`).
The cache passed around between the calls of a round is the **scratch**: the same `KVCache`
with the tree's K/V written at those slots and `lengths` unchanged, so nothing the tree wrote is
visible to `forward`. `commit` then moves the root and the accepted nodes to contiguous slots.

Sliding-window layers (Mistral) are exact: a node at position p sees keys at positions > p - window,
counting tree keys at their depth positions; such configs attend with the general masked attention
(the Pallas tree-attention kernel has no window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cache_attention import masked
from pallas_kernels.tree_attention import tree_attention
from ssm_llm.cache import KVCache
from ssm_llm.compressed_cache import CompressedCache
from ssm_llm.config import ModelConfig
from ssm_llm.layer_layout import run_layers
from ssm_llm.models.attention_lm import finish_block, project_qkv
from ssm_llm.models.lm_head import embed_tokens, logits_from_hidden
from ssm_llm.norm import rms_norm
from ssm_llm.rope import apply_rope, inverse_frequencies, rope_tables
from ssm_llm.speculative.tree import DraftTree, ancestor_mask, check_tree, depths


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_cache(name: str, config, cache) -> None:
    if isinstance(cache, CompressedCache):
        raise TypeError(
            f"{name}: tree verification needs a dense KVCache; a CompressedCache "
            f"({type(cache.policy).__name__}) cannot hold draft-tree slots"
        )
    if not isinstance(cache, KVCache):
        raise TypeError(f"{name}: expected a KVCache, got {type(cache).__name__}")
    if config is not None:
        expected = (config.num_layers, cache.batch, config.num_kv_heads, cache.max_len, config.head_dim)
        if cache.k.shape != expected or cache.v.shape != expected:
            raise ValueError(
                f"{name}: cache k/v must be [L, B, H_kv, S, D] = {expected} for this config, "
                f"got {cache.k.shape} and {cache.v.shape}"
            )


def _check_same_cache(name: str, cache: KVCache, scratch) -> None:
    _check_cache(name, None, scratch)
    if (scratch.k.shape, scratch.v.shape, scratch.lengths.shape) != (cache.k.shape, cache.v.shape, cache.lengths.shape):
        raise ValueError(
            f"{name}: scratch k/v {scratch.k.shape} and lengths {scratch.lengths.shape} must match "
            f"the cache's {cache.k.shape} and {cache.lengths.shape}"
        )


def _check_room(name: str, lengths, needed, max_len: int, what: str) -> None:
    """ValueError if a concrete row would need more than max_len slots (`needed: [B]` slots past lengths)."""
    if not _concrete(lengths, needed):
        return
    end = np.asarray(lengths) + np.asarray(needed)
    if end.max() > max_len:
        row = int(end.argmax())
        raise ValueError(
            f"{name}: row {row} holds {int(np.asarray(lengths)[row])} tokens and {what} needs "
            f"{int(np.asarray(needed)[row])} more slots, past the cache's max_len {max_len}; "
            f"allocate the cache with room for the tree"
        )


def _check_nodes(nodes, batch: int, size: int) -> None:
    if nodes.ndim != 2 or nodes.shape[0] != batch or not 1 <= nodes.shape[1] <= size:
        raise ValueError(f"nodes must be [B, M] with B = {batch} and 1 <= M <= N = {size}, got {nodes.shape}")
    if not jnp.issubdtype(nodes.dtype, jnp.integer):
        raise ValueError(f"nodes must be integer node indices, got dtype {nodes.dtype}")
    if _concrete(nodes):
        arr = np.asarray(nodes)
        if arr.min() < 0 or arr.max() >= size:
            raise ValueError(f"nodes must lie in [0, {size}), got {arr.tolist()}")
        if (np.diff(arr, axis=1) <= 0).any():
            raise ValueError(f"nodes must be strictly increasing along each row, got {arr.tolist()}")


def _tree_visibility(tree: DraftTree):
    """(mask [B, N, N] bool, depth [B, N] int32): what each node sees inside the tree, and its depth.
    Unused nodes are masked out of every other node's view even if a malformed tree links to them."""
    n = tree.size
    mask = ancestor_mask(tree.parents) & (tree.used[:, None, :] | jnp.eye(n, dtype=bool)[None])
    return mask, depths(tree.parents)


def _cache_visibility(lengths, nodes, mask, depth, seq: int):
    """For `nodes: [B, M]` over the S cache slots: (visible [B, M, S] bool: the prefix, the node's
    ancestors and itself; distance [B, M, S] int32: query position minus key position, for windows).
    A prefix slot s sits at position s, tree slot lengths + j at position lengths + depth(j)."""
    size = mask.shape[1]
    rel = jnp.arange(seq)[None, :] - lengths[:, None]  # [B, S]: the tree node a slot holds, if 0 <= rel < N
    node_of_slot = jnp.clip(rel, 0, size - 1)
    rows = jnp.take_along_axis(mask, nodes[:, :, None], axis=1)  # [B, M, N]
    allowed = jnp.take_along_axis(rows, jnp.broadcast_to(node_of_slot[:, None, :], rows.shape[:2] + (seq,)), axis=2)
    visible = (rel < 0)[:, None, :] | (((rel >= 0) & (rel < size))[:, None, :] & allowed)
    key_pos = jnp.where(rel < 0, rel, jnp.take_along_axis(depth, node_of_slot, axis=1))  # relative to lengths
    distance = jnp.take_along_axis(depth, nodes, axis=1)[:, :, None] - key_pos[:, None, :]
    return visible, distance


def _tree_layer(config: ModelConfig, impl: str, kernel: bool, inputs, carry, layer):
    """One decoder block over the tree nodes: write their K/V at their slots, attend (with the
    tree-attention kernel when `kernel`, else the masked attention over the cache), MLP."""
    lengths, slots, mask, visible, distance, cos, sin = inputs
    x, (k_all, v_all) = carry
    p, index, window = layer
    q, k, v = project_qkv(config, p, x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = jnp.arange(x.shape[0])[:, None]
    k_all = k_all.at[index, rows, :, slots].set(k.astype(k_all.dtype))
    v_all = v_all.at[index, rows, :, slots].set(v.astype(v_all.dtype))
    if kernel:
        attn = tree_attention(q, k_all, v_all, lengths, mask, layer=index, impl=impl)
    else:
        # A node at position p sees keys at positions > p - window (as `cache_attention` does).
        in_window = (window <= 0) | (distance < window)
        attn = masked(q, k_all, v_all, visible & in_window, layer=index, impl=impl)
    return finish_block(config, p, x, attn), (k_all, v_all)


def tree_logits(
    params: dict,
    config: ModelConfig,
    cache: KVCache,
    tree: DraftTree,
    scratch: KVCache | None = None,
    nodes: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, KVCache]:
    """Score tree nodes against `cache`, which holds each row's committed tokens except the root
    (`lengths: [B]`).

    Node i of row b sits at cache slot `lengths[b] + i` and RoPE position `lengths[b] + depth(i)`; it
    attends to the whole prefix and to its ancestors and itself. `nodes: [B, M]` (default: all N
    nodes) lists the nodes to compute now, strictly increasing per row; the nodes they attend to must
    be earlier in `nodes` or already in `scratch` (from an earlier call), so a draft model can grow a
    tree level by level. `scratch`: the cache holding the tree K/V computed so far (None: `cache`).
    Unused nodes may be computed (their logits are garbage) but are never visible to other nodes.

    Returns logits `[B, M, V]` (float32 for float32 params) and the new scratch: `scratch` with the
    nodes' K/V written at their slots, `lengths` = `cache.lengths`. Needs `lengths + N <= max_len`.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"attention_tree needs an attention ModelConfig, got {type(config).__name__}")
    _check_cache("tree_logits", config, cache)
    check_tree(tree, config.vocab_size)
    batch, size = tree.batch, tree.size
    if batch != cache.batch:
        raise ValueError(f"tree_logits: tree batch {batch} != cache batch {cache.batch}")
    _check_room("tree_logits", cache.lengths, np.full(batch, size), cache.max_len, f"a tree of N = {size} nodes")
    if scratch is None:
        scratch = cache
    else:
        _check_same_cache("tree_logits", cache, scratch)
    full = nodes is None
    if full:
        nodes = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
    else:
        nodes = jnp.asarray(nodes)
        _check_nodes(nodes, batch, size)
        nodes = nodes.astype(jnp.int32)

    lengths = cache.lengths
    mask, depth = _tree_visibility(tree)
    positions = lengths[:, None] + jnp.take_along_axis(depth, nodes, axis=1)
    cos, sin = rope_tables(positions, inverse_frequencies(config.rope, config.head_dim))
    slots = lengths[:, None] + nodes
    # The tree-attention kernel scores all N nodes at slots lengths..lengths+N-1 and has no window.
    kernel = full and not any(config.layer_windows)
    if kernel:
        visible = distance = None
    else:
        visible, distance = _cache_visibility(lengths, nodes, mask, depth, cache.max_len)
    inputs = (lengths, slots, mask, visible, distance, cos, sin)
    x = embed_tokens(params, config, jnp.take_along_axis(tree.tokens, nodes, axis=1))
    x, (k_all, v_all) = run_layers(
        lambda c, layer: _tree_layer(config, impl, kernel, inputs, c, layer),
        (x, (scratch.k, scratch.v)),
        params["layers"],
        (config.layer_windows,),
    )
    logits = logits_from_hidden(params, config, rms_norm(x, params["final_norm"], config.rms_norm_eps))
    return logits, KVCache(k=k_all, v=v_all, lengths=lengths)


def commit(
    cache: KVCache, scratch: KVCache, path: jax.Array, accepted: jax.Array, active: jax.Array | None = None
) -> KVCache:
    """The cache after acceptance: the root (slot `lengths[b]` of `scratch`) and the accepted nodes
    `path[b, 1..accepted[b]]` at contiguous slots `lengths[b] + 1 .. lengths[b] + accepted[b]`, and
    `lengths + 1 + accepted`.

    path: [B, N] int32 node indices (`path[b, 0] = 0`; entries past `accepted[b]` are ignored);
    accepted: [B] int32; active: [B] bool (default all) — inactive rows keep their lengths and every
    visible slot (< lengths). The result is built in `scratch`'s buffers (only `cache.lengths` is
    read from `cache`), so under `jit` with donation the cache is never copied; slots past a row's
    new length hold leftovers of the tree, which nothing attends to.
    """
    _check_cache("commit", None, cache)
    _check_same_cache("commit", cache, scratch)
    batch, max_len = cache.batch, cache.max_len
    if path.ndim != 2 or path.shape[0] != batch:
        raise ValueError(f"commit: path must be [B, N] with B = {batch}, got {path.shape}")
    if accepted.shape != (batch,):
        raise ValueError(f"commit: accepted must be [{batch}], got {accepted.shape}")
    if active is not None and active.shape != (batch,):
        raise ValueError(f"commit: active must be [{batch}], got {active.shape}")
    size = path.shape[1]
    if _concrete(accepted) and (np.asarray(accepted).min() < 0 or np.asarray(accepted).max() >= size):
        raise ValueError(
            f"commit: accepted must lie in [0, {size - 1}] (path has {size} entries), "
            f"got {np.asarray(accepted).tolist()}"
        )
    _check_room("commit", cache.lengths, accepted + 1, max_len, "the root and the accepted path")

    lengths = cache.lengths
    steps = jnp.arange(size, dtype=jnp.int32)[None, :]
    keep = steps <= accepted[:, None]
    if active is not None:
        keep = keep & active[:, None]
    rows = jnp.arange(batch)[:, None]
    source = lengths[:, None] + jnp.clip(path, 0, size - 1)  # [B, N]
    # Slots not kept get an index past the cache, which the scatter drops.
    target = jnp.where(keep, lengths[:, None] + steps, max_len)
    k = scratch.k.at[:, rows, :, target].set(scratch.k[:, rows, :, source], mode="drop")
    v = scratch.v.at[:, rows, :, target].set(scratch.v[:, rows, :, source], mode="drop")
    grown = lengths + 1 + accepted.astype(lengths.dtype)
    new_lengths = grown if active is None else jnp.where(active, grown, lengths)
    return KVCache(k=k, v=v, lengths=new_lengths)
