"""The pure-jnp block-sparse prefill attention: each query block attends to a listed set of key blocks plus a
listed set of key columns (MInference's vertical-slash / block-sparse / A-shape patterns, once their indices
are estimated), causal, GQA, ragged lengths, optional sliding window.

The reference is also the CPU fast path: per chunk of query blocks it gathers only the listed key blocks and
columns, so its work is proportional to what is attended, not to T^2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min
# Key blocks gathered per chunk of query blocks in the reference (chunk = GATHERED // K query blocks): bounds
# the gathered keys to GATHERED x block x H x D floats (128 x 64 x 9 x 64 x 4 B = 19 MB for SmolLM2). Measured on
# a 2-core AMD EPYC, SmolLM2's heads at T = 8192, 64-token blocks: K = 8 took 0.27 / 0.23 / 0.41 s with 8 / 16
# / 32 query blocks per chunk, K = 16 took 0.40 / 0.73 / 1.17 s (dense causal: 1.24 s).
GATHERED = 128


def check_sparse_inputs(q, k, v, blocks, columns, lengths, block: int) -> None:
    """ValueError naming what is wrong with the shapes (see `block_sparse_attention_ref`)."""
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"block_sparse_attention: query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if k.shape != v.shape or k.shape[:2] != (batch, steps) or k.shape[3] != dim:
        raise ValueError(
            f"block_sparse_attention: k {k.shape} and v {v.shape} must be [B, T, H_kv, D] matching q {q.shape}"
        )
    if block < 1:
        raise ValueError(f"block_sparse_attention: block must be >= 1, got {block}")
    n_blocks = -(-steps // block)
    if blocks.ndim != 4 or blocks.shape[:3] != (batch, heads, n_blocks):
        raise ValueError(
            f"block_sparse_attention: blocks must be [B, H, ceil(T / block), K] = [{batch}, {heads}, {n_blocks}, K], "
            f"got {blocks.shape}"
        )
    if columns is not None and (columns.ndim != 3 or columns.shape[:2] != (batch, heads)):
        raise ValueError(
            f"block_sparse_attention: columns must be [B, H, C] = [{batch}, {heads}, C], got {columns.shape}"
        )
    if lengths is not None and lengths.shape != (batch,):
        raise ValueError(f"block_sparse_attention: lengths must be [{batch}], got {lengths.shape}")


def canonical_indices(blocks, columns, n_blocks: int, steps: int):
    """Sorted block ids and columns with duplicates and out-of-range entries set to -1, so every listed key
    counts once: blocks [B, H, N, K] in [0, n_blocks), columns [B, H, C] in [0, steps) (or None)."""

    def unique(x, limit):
        x = jnp.where((x >= 0) & (x < limit), x, -1).astype(jnp.int32)
        x = jnp.sort(x, axis=-1)
        repeat = jnp.concatenate([jnp.zeros_like(x[..., :1], bool), x[..., 1:] == x[..., :-1]], axis=-1)
        return jnp.where(repeat, -1, x)

    return unique(blocks, n_blocks), None if columns is None else unique(columns, steps)


def kernel_indices(k, v, blocks, columns, steps: int, tile: int):
    """What both Pallas kernels take: canonical block ids [B, H, N, K], and the canonical columns padded with -1
    to a positive multiple of `tile` [B, H, C'] with each query head's keys and values at them [B, H, C', D]
    (kv head h // (H / H_kv))."""
    batch, heads, n_blocks, _ = blocks.shape
    if columns is None:
        columns = jnp.full((batch, heads, 0), -1, jnp.int32)
    blocks, columns = canonical_indices(blocks, columns, n_blocks, steps)
    padded = max(1, -(-columns.shape[2] // tile)) * tile  # one all -1 tile when none are listed
    columns = jnp.pad(columns, ((0, 0), (0, 0), (0, padded - columns.shape[2])), constant_values=-1)
    head_kv = jnp.arange(heads) // (heads // k.shape[2])
    at = (jnp.arange(batch)[:, None, None], jnp.maximum(columns, 0), head_kv[None, :, None])
    return blocks, columns, k[at], v[at]


def _visible(t, s, length, window):
    """Causal, within the row's length and the sliding window (0: none)."""
    return (s <= t) & (s < length) & ((window <= 0) | (s > t - window))


def block_sparse_attention_ref(q, k, v, blocks, columns=None, lengths=None, window=0, scale=None, *, block: int = 64):
    """q: [B, T, H, D]; k, v: [B, T, H_kv, D]; blocks: [B, H, ceil(T / block), K] int key-block ids per query
    block; columns: [B, H, C] int key positions (or None) -> [B, T, H, D] in q's dtype (float32 softmax).

    Query t of head h sees key s when s <= t, s < lengths[b] (None: T), (window == 0 or s > t - window) and
    either s's block s // block is listed in blocks[b, h, t // block] or s is listed in columns[b, h].
    Entries that are negative, out of range or repeated count once or not at all. A query that sees no key
    is zero. All blocks listed for every query block is causal flash attention.
    """
    check_sparse_inputs(q, k, v, blocks, columns, lengths, block)
    if columns is not None and columns.shape[2] == 0:
        columns = None
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    rep = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    n_blocks = blocks.shape[2]
    padded = n_blocks * block
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32)
    blocks, columns = canonical_indices(blocks, columns, n_blocks, steps)
    pad = ((0, 0), (0, padded - steps), (0, 0), (0, 0))
    qh = jnp.pad(q, pad).transpose(0, 2, 1, 3).reshape(batch, heads, n_blocks, block, dim)
    # Keys of each query head (its kv head's, never copied per head): [B, H_kv, n_blocks, block, D].
    kb, vb = (jnp.pad(x, pad).transpose(0, 2, 1, 3).reshape(batch, kv_heads, n_blocks, block, dim) for x in (k, v))
    bi = jnp.arange(batch)[:, None, None, None]
    hi = (jnp.arange(heads) // rep)[None, :, None, None]
    if columns is not None:
        cols = jnp.maximum(columns, 0)
        kc, vc = (
            x.reshape(batch, kv_heads, padded, dim)[jnp.arange(batch)[:, None, None], hi[..., 0], cols]
            for x in (kb, vb)
        )  # [B, H, C, D]
    chunk = max(1, min(n_blocks, GATHERED // blocks.shape[3]))
    n_chunks = -(-n_blocks // chunk)

    def one_chunk(c):
        first = c * chunk
        ids = jax.lax.dynamic_slice_in_dim(
            jnp.pad(blocks, ((0, 0), (0, 0), (0, n_chunks * chunk - n_blocks), (0, 0)), constant_values=-1),
            first,
            chunk,
            2,
        )
        qc = jax.lax.dynamic_slice_in_dim(
            jnp.pad(qh, ((0, 0), (0, 0), (0, n_chunks * chunk - n_blocks), (0, 0), (0, 0))), first, chunk, 2
        )  # [B, H, G, block, D]
        t = (first + jnp.arange(chunk))[:, None] * block + jnp.arange(block)[None, :]  # [G, block]
        kg, vg = (x[bi, hi, jnp.maximum(ids, 0)] for x in (kb, vb))  # [B, H, G, K, block, D]
        s_pos = ids[..., None] * block + jnp.arange(block)  # [B, H, G, K, block]
        scores = jnp.einsum("bhgqd,bhgksd->bhgqks", qc, kg, preferred_element_type=jnp.float32) * scale
        seen = (ids[..., None] >= 0)[:, :, :, None] & _visible(
            t[None, None, :, :, None, None], s_pos[:, :, :, None], lengths[:, None, None, None, None, None], window
        )  # [B, H, G, block, K, block]
        scores = jnp.where(seen, scores, NEG).reshape(*scores.shape[:4], -1)
        seen = seen.reshape(scores.shape)
        m = jnp.max(scores, axis=-1)
        if columns is not None:
            col_block = columns // block
            listed = jnp.any(col_block[:, :, None, :, None] == ids[:, :, :, None, :], axis=-1)  # [B, H, G, C]
            col_seen = ((columns >= 0)[:, :, None] & ~listed)[:, :, :, None, :] & _visible(
                t[None, None, :, :, None], columns[:, :, None, None, :], lengths[:, None, None, None, None], window
            )  # [B, H, G, block, C]
            col_scores = jnp.einsum("bhgqd,bhcd->bhgqc", qc, kc, preferred_element_type=jnp.float32) * scale
            col_scores = jnp.where(col_seen, col_scores, NEG)
            m = jnp.maximum(m, jnp.max(col_scores, axis=-1))
        # One softmax over the listed blocks and the columns (a shared max), each part's value product apart.
        weights = jnp.where(seen, jnp.exp(scores - m[..., None]), 0.0)
        values = vg.reshape(*vg.shape[:3], -1, dim)  # [B, H, G, K * block, D]
        out = jnp.einsum("bhgqs,bhgsd->bhgqd", weights.astype(v.dtype), values, preferred_element_type=jnp.float32)
        denom = jnp.sum(weights, axis=-1)
        if columns is not None:
            col_weights = jnp.where(col_seen, jnp.exp(col_scores - m[..., None]), 0.0)
            out = out + jnp.einsum(
                "bhgqc,bhcd->bhgqd", col_weights.astype(v.dtype), vc, preferred_element_type=jnp.float32
            )
            denom = denom + jnp.sum(col_weights, axis=-1)
        return out / jnp.where(denom > 0, denom, 1.0)[..., None]  # [B, H, G, block, D]

    out = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # [n_chunks, B, H, G, block, D]
    out = out.transpose(1, 2, 0, 3, 4, 5).reshape(batch, heads, n_chunks * chunk * block, dim)[:, :, :steps]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
