"""The engine's one compiled step: a ragged batch of slots, each feeding 0..C new tokens (a prefill chunk, a
decode token, or nothing), through the model, returning the logits at each slot's last fed token.

Attention models keep K/V in a page pool `[L, pages, H_kv, page_size, D]` addressed by per-slot block
tables (`pallas_kernels.ragged_paged_attention`); state-space models keep one conv + SSM state per slot (an
`SSMCache` whose batch is the slot count), advanced by the family's own `hidden_states`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import (
    StreamingMask,
    kv_groups,
    page_slots,
    quantize_kv,
    ragged_paged_attention,
)
from ssm_llm.config import ModelConfig
from ssm_llm.layer_layout import run_layers
from ssm_llm.models import family_module
from ssm_llm.models.attention_lm import check_linear_kinds, finish_block, project_qkv
from ssm_llm.models.lm_head import embed_tokens, logits_from_hidden
from ssm_llm.norm import rms_norm
from ssm_llm.rope import apply_rope, inverse_frequencies, rope_tables
from ssm_llm.sampling import greedy_tokens
from ssm_llm.ssm_cache import SSMCache


@flax.struct.dataclass
class PagePool:
    """The K/V pages of every layer: k, v `[L, pages, H_kv, page_size, D]`; int8 pages have float32 scales
    per position, head and channel group in k_scale, v_scale `[L, pages, H_kv, page_size, G]` (else None)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


def init_pages(config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> PagePool:
    """A zeroed pool of `num_pages` pages of `page_size` positions; `dtype` int8 keeps codes and scales."""
    shape = (config.num_layers, num_pages, config.num_kv_heads, page_size, config.head_dim)
    if jnp.dtype(dtype) != jnp.int8:
        return PagePool(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    k, v = jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8)
    scales = (*shape[:-1], kv_groups(config.head_dim))
    # Two buffers, not one shared: the engine step donates the pool, and a buffer cannot be donated twice.
    return PagePool(k=k, v=v, k_scale=jnp.ones(scales, jnp.float32), v_scale=jnp.ones(scales, jnp.float32))


def _paged_hidden(
    params, config: ModelConfig, tokens, pool: PagePool, block_tables, starts, counts, impl, streaming=None
):
    """The decoder stack over `tokens [S, C]` (row s: `counts[s]` real tokens at positions starts[s]...),
    writing their K/V into the pool; `streaming`: a `StreamingMask` of the rows, or None. Returns
    final-normed hidden states [S, C, H] and the pool."""
    check_linear_kinds(params, config)
    steps = tokens.shape[1]
    positions = starts[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
    valid = jnp.arange(steps)[None, :] < counts[:, None]
    lengths = starts + counts
    cos, sin = rope_tables(positions, inverse_frequencies(config.rope, config.head_dim))
    page_ids, offsets = page_slots(block_tables, positions, valid, pool.page_size, pool.num_pages)

    def write(pages, index, values):
        return pages.at[index, page_ids, :, offsets].set(values.astype(pages.dtype), mode="drop")

    def block(carry, layer):
        x, pool = carry
        p, index, window = layer
        q, k, v = project_qkv(config, p, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pool.k_scale is None:
            pool = pool.replace(k=write(pool.k, index, k), v=write(pool.v, index, v))
            scales = (None, None)
        else:  # int8 pages: codes and a scale per position and head
            (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
            pool = PagePool(
                k=write(pool.k, index, k),
                v=write(pool.v, index, v),
                k_scale=write(pool.k_scale, index, k_scale),
                v_scale=write(pool.v_scale, index, v_scale),
            )
            scales = (pool.k_scale[index], pool.v_scale[index])
        attn = ragged_paged_attention(
            q,
            pool.k[index],
            pool.v[index],
            block_tables,
            positions,
            lengths,
            window,
            None,
            *scales,
            streaming,
            impl=impl,
        )
        return finish_block(config, p, x, attn), pool

    x, pool = run_layers(block, (embed_tokens(params, config, tokens), pool), params["layers"], (config.layer_windows,))
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), pool


def _last_logits(params, config, h, counts):
    """Logits at each row's last real token: [S, V] (rows with no token: row 0's position, ignored)."""
    last = jnp.take_along_axis(h, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]
    return logits_from_hidden(params, config, last).astype(jnp.float32)


@flax.struct.dataclass
class Rows:
    """Some slots' tokens for one pass: tokens [R, C] (row r: `counts[r]` real tokens at positions
    starts[r]...), their block tables [R, M] (attention) and `slots` [R], the slot of each row (a padding
    row names slot S, out of range, and has no tokens); `streaming`: the rows' `StreamingMask` when one of
    them streams (StreamingLLM pages), else None."""

    tokens: jax.Array
    block_tables: jax.Array
    starts: jax.Array
    counts: jax.Array
    slots: jax.Array
    streaming: StreamingMask | None = None


def _pass(params, config, state, rows: Rows, impl):
    """The model over `rows`; returns (logits [R, V] at each row's last real token, state)."""
    if isinstance(state, PagePool):
        h, state = _paged_hidden(
            params, config, rows.tokens, state, rows.block_tables, rows.starts, rows.counts, impl, rows.streaming
        )
        return _last_logits(params, config, h, rows.counts), state
    slots = jnp.minimum(rows.slots, state.lengths.shape[0] - 1)  # padding rows read any slot, write none
    mine = SSMCache(conv_state=state.conv_state[:, slots], ssm_state=state.ssm_state[:, slots], lengths=rows.starts)
    h, mine = family_module(config).hidden_states(params, config, rows.tokens, mine, rows.counts, impl)
    state = state.replace(
        conv_state=state.conv_state.at[:, rows.slots].set(mine.conv_state, mode="drop"),
        ssm_state=state.ssm_state.at[:, rows.slots].set(mine.ssm_state, mode="drop"),
        lengths=state.lengths.at[rows.slots].set(mine.lengths, mode="drop"),
    )
    return _last_logits(params, config, h, rows.counts), state


def _verify_pass(params, config, pool: PagePool, rows: Rows, impl):
    """The model over `rows` of a token and its drafts; returns (the greedy token after each position [R, W],
    pool)."""
    h, pool = _paged_hidden(params, config, rows.tokens, pool, rows.block_tables, rows.starts, rows.counts, impl)
    return greedy_tokens(logits_from_hidden(params, config, h)), pool


def step(
    params,
    config,
    state,
    decode: Rows | None,
    prefill: Rows | None,
    num_slots: int,
    impl: str = "auto",
    verify: Rows | None = None,
):
    """One engine step: `decode` rows of one token each, `prefill` rows of a chunk each and `verify` rows of a
    token and its draft tokens (speculative decoding; attention models), any of them None, each holding
    different slots, as passes of one compiled program, so decode rows do not pay for a wider row's width.
    `state`: a `PagePool` (attention) or an `SSMCache` with one row per slot (Mamba). Returns (logits
    [num_slots, V] float32 at each decode / prefill slot's last token (other slots: zeros), the greedy token
    after each verify row's position [R_v, W] (or None), state)."""
    logits = jnp.zeros((num_slots, config.vocab_size), jnp.float32)
    for rows in (prefill, decode):
        if rows is not None:
            out, state = _pass(params, config, state, rows, impl)
            logits = logits.at[rows.slots].set(out, mode="drop")
    checked = None
    if verify is not None:
        checked, state = _verify_pass(params, config, state, verify, impl)
    return logits, checked, state


def reset_slots(state: SSMCache, fresh) -> SSMCache:
    """Zero the states of the slots where `fresh` [S] is True (new requests start from the empty state)."""
    keep = ~fresh

    def clear(x, axis):
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        return jnp.where(keep.reshape(shape), x, jnp.zeros((), x.dtype))

    return state.replace(
        conv_state=clear(state.conv_state, 1), ssm_state=clear(state.ssm_state, 1), lengths=clear(state.lengths, 0)
    )
