"""The one protocol every model family follows: `init_params`, `init_cache`, `forward`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.cache import KVCache
from ssm_llm.compressed_cache import CompressedCache
from ssm_llm.config import ModelConfig
from ssm_llm.models import family_module, family_of
from ssm_llm.models.lm_head import logits_from_hidden
from ssm_llm.param_check import check_params
from ssm_llm.sharding import SequenceParallel, check_mesh, shard_cache
from ssm_llm.ssm_cache import SSMCache
from ssm_llm.ssm_config import Mamba2Config

Cache = KVCache | SSMCache


def init_params(config, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters for `config` (tests, benchmarks, training from scratch)."""
    return family_module(config).init_params(config, key, dtype)


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32, mesh=None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    Attention models get a `KVCache` of `max_len` positions; state-space models an `SSMCache`
    whose size does not depend on the length (`max_len` is validated, then unused). With a `mesh`
    (`jax.sharding.Mesh`), the cache is placed on it by `ssm_llm.sharding`'s rules.
    """
    if mesh is not None:
        check_mesh(config, mesh, batch=batch)
    cache = family_module(config).init_cache(config, batch, max_len, dtype)
    return cache if mesh is None else shard_cache(cache, config, mesh)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(tokens, vocab_size: int) -> None:
    """Raise ValueError if any concrete token id is outside [0, vocab_size)."""
    if not _is_concrete(tokens):
        return
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)].ravel()[0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")


def _check_compressed_step(config, tokens, cache: CompressedCache, token_counts) -> None:
    """A compressed cache takes decode steps (one token per sequence) while it has room."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"a CompressedCache belongs to an attention model, not a {type(config).__name__}")
    if tokens.shape != (cache.batch, 1):
        raise ValueError(
            f"a compressed cache ({type(cache.policy).__name__}) decodes one token per sequence: "
            f"tokens must be [{cache.batch}, 1], got {tuple(tokens.shape)}"
        )
    if token_counts is not None and token_counts.shape != (cache.batch,):
        raise ValueError(f"token_counts must have shape ({cache.batch},), got {token_counts.shape}")
    check_token_ids(tokens, config.vocab_size)
    context = config.max_position_embeddings
    if _is_concrete(cache.lengths) and _is_concrete(cache.used):
        if not cache.policy.unbounded and context is not None and int(np.max(cache.lengths)) + 1 > context:
            raise ValueError(
                f"{type(cache.policy).__name__}: the next token would sit at position "
                f"{int(np.max(cache.lengths))}, past the model's context of {context}"
            )
        # An append-only policy overflows its slots; a ring buffer (StreamingLLM) never does.
        if int(np.max(cache.policy.advance(np.asarray(cache.used), 1, cache.capacity))) > cache.capacity:
            raise ValueError(
                f"{type(cache.policy).__name__}: the compressed cache is full ({cache.capacity} slots "
                f"per sequence); compress with a larger max_len to decode further"
            )


def _check_forward_inputs(config, tokens, cache: Cache, token_counts) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, steps], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    batch, steps = tokens.shape
    if steps == 0:
        raise ValueError("tokens has no steps (shape [B, 0]); pass at least one token per sequence")
    if isinstance(cache, CompressedCache):
        _check_compressed_step(config, tokens, cache, token_counts)
        return
    expected_cache = family_of(config).cache_type
    if not isinstance(cache, expected_cache):
        raise TypeError(
            f"a {type(config).__name__} needs a {expected_cache.__name__}, got {type(cache).__name__}; "
            f"create it with ssm_llm.init_cache(config, ...)"
        )
    if batch != cache.batch:
        raise ValueError(f"tokens batch {batch} != cache batch {cache.batch}")
    bounded = isinstance(cache, KVCache)
    if bounded and steps > cache.max_len:
        raise ValueError(f"{steps} tokens do not fit a cache of max_len {cache.max_len}")
    if token_counts is not None and token_counts.shape != (batch,):
        raise ValueError(f"token_counts must have shape ({batch},), got {token_counts.shape}")
    check_token_ids(tokens, config.vocab_size)
    if _is_concrete(cache.lengths) and (token_counts is None or _is_concrete(token_counts)):
        counts = np.full(batch, steps) if token_counts is None else np.asarray(token_counts)
        if counts.min() < 0 or counts.max() > steps:
            raise ValueError(f"token_counts must lie in [0, {steps}], got {counts.tolist()}")
        needed = np.asarray(cache.lengths) + counts
        if bounded and needed.max() > cache.max_len:
            row = int(needed.argmax())
            raise ValueError(
                f"cache overflow: sequence {row} would hold {int(needed[row])} tokens but the cache "
                f"max_len is {cache.max_len}; allocate a larger cache with init_cache(..., max_len=...)"
            )


def runtime_invalid_rows(config, tokens, cache: Cache, token_counts) -> tuple[jax.Array, jax.Array]:
    """([B] bool, [B] bool): rows with a token id outside the vocabulary among their real tokens, and rows
    that overflow their cache (or the model's context, for a compressed cache). Traceable: these are the
    checks `forward` cannot run in Python when its inputs are traced under `jax.jit`."""
    steps = tokens.shape[1]
    real = jnp.arange(steps)[None, :] < token_counts[:, None]
    bad_ids = (((tokens < 0) | (tokens >= config.vocab_size)) & real).any(axis=1)
    bad_ids |= (token_counts < 0) | (token_counts > steps)
    if isinstance(cache, CompressedCache):
        overflow = cache.policy.advance(cache.used, token_counts, cache.capacity) > cache.capacity
        context = config.max_position_embeddings
        if not cache.policy.unbounded and context is not None:
            overflow |= cache.lengths + token_counts > context
    elif isinstance(cache, KVCache):
        overflow = cache.lengths + token_counts > cache.max_len
    else:
        overflow = jnp.zeros_like(bad_ids)
    return bad_ids, overflow


_STATIC = ("config", "impl", "cache_is_empty", "checkify_errors", "sequence_parallel")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward(params, config, tokens, cache, token_counts, impl, cache_is_empty, checkify_errors, sequence_parallel):
    bad_ids, overflow = runtime_invalid_rows(config, tokens, cache, token_counts)
    if checkify_errors:
        from jax.experimental import checkify

        checkify.check(
            ~bad_ids.any(),
            f"forward: a token id is outside the vocabulary [0, {config.vocab_size}) (or "
            "token_counts lies outside [0, steps]) in row {row}",
            row=jnp.argmax(bad_ids),
        )
        checkify.check(
            ~overflow.any(), "forward: cache overflow in row {row}: allocate a larger cache", row=jnp.argmax(overflow)
        )
    h, cache = family_module(config).hidden_states(
        params, config, tokens, cache, token_counts, impl, cache_is_empty, sequence_parallel
    )
    logits = logits_from_hidden(params, config, h)
    # Traced inputs skip the Python checks: a row that failed them gets NaN logits instead of a silent,
    # plausible wrong answer (gathers clamp bad ids; cache writes clamp past the end).
    return jnp.where((bad_ids | overflow)[:, None, None], jnp.nan, logits), cache


def _as_tokens(tokens):
    if not _is_concrete(tokens):
        return tokens
    try:
        arr = np.asarray(tokens)
    except (ValueError, TypeError) as e:
        raise ValueError(f"tokens must be a [batch, steps] array of int token ids ({e})") from None
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be a [batch, steps] array of int token ids, got dtype {arr.dtype}")
    return jnp.asarray(arr)


def _as_token_counts(token_counts):
    if token_counts is None:
        return None
    if not _is_concrete(token_counts):
        return token_counts
    arr = np.asarray(token_counts)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_counts must be [batch] ints, got {token_counts!r}")
    return arr


def forward(
    params: dict,
    config,
    tokens: jax.Array,
    cache: Cache,
    *,
    token_counts: jax.Array | None = None,
    impl: str = "auto",
    checkify_errors: bool = False,
    sequence_parallel: SequenceParallel | None = None,
) -> tuple[jax.Array, Cache]:
    """Append `tokens: [B, T]` to `cache` and return `(logits [B, T, V], new_cache)`.

    Works for prefill (T > 1) and decode (T = 1) of every model family (attention: `KVCache`;
    Mamba / Mamba-2: `SSMCache`); each sequence continues at its own cached length.
    `token_counts: [B]` marks how many of each row's tokens are real when rows are right-padded
    (default: all T); the cache advances by that many. Never mutates its inputs.

    Bad inputs raise ValueError naming them: params that do not match `config` (always, also under
    `jax.jit`), and, when the values are concrete, token ids outside the vocabulary and cache overflow.
    Under `jax.jit` the last two cannot be checked in Python: such a row gets NaN logits (and its cache
    row is invalid). `checkify_errors=True` turns them into `jax.experimental.checkify` errors instead:
    `err, out = checkify.checkify(jax.jit(f))(...); err.throw()` with `f` calling forward with it.

    `sequence_parallel` (an `ssm_llm.sharding.SequenceParallel`): a long prompt split over a mesh axis —
    RingAttention for attention models (a fresh prefill: the cache must be empty), the sequence-parallel
    SSD for Mamba-2 (from any state).
    """
    family_module(config)  # a TypeError naming what config should be
    check_params(params, config)
    tokens = _as_tokens(tokens)
    token_counts = _as_token_counts(token_counts)
    _check_forward_inputs(config, tokens, cache, token_counts)
    if token_counts is None:
        token_counts = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    # A cache known to be empty takes the cheaper prefill attention (same result).
    cache_is_empty = (
        not isinstance(cache, CompressedCache) and _is_concrete(cache.lengths) and not np.asarray(cache.lengths).any()
    )
    traced = not all(_is_concrete(x) for x in (tokens, token_counts, cache.lengths))
    check_sequence_parallel(config, sequence_parallel, cache_is_empty)
    return _forward(
        params,
        config,
        tokens.astype(jnp.int32),
        cache,
        jnp.asarray(token_counts, jnp.int32),
        impl,
        cache_is_empty,
        checkify_errors and traced,
        sequence_parallel,
    )


def check_sequence_parallel(config, sequence_parallel, cache_is_empty: bool) -> None:
    """Raise unless `sequence_parallel` is None or a `SequenceParallel` this model and cache can use: an
    attention model's fresh prefill (an empty dense cache), or any Mamba-2 step."""
    if sequence_parallel is None:
        return
    if not isinstance(sequence_parallel, SequenceParallel):
        raise TypeError(
            f"sequence_parallel must be an ssm_llm.sharding.SequenceParallel, got {type(sequence_parallel).__name__}"
        )
    if type(config) not in (ModelConfig, Mamba2Config):
        raise ValueError(
            f"sequence_parallel runs attention models (RingAttention) and Mamba-2 (sequence-parallel SSD), "
            f"not {type(config).__name__}"
        )
    if type(config) is ModelConfig and not cache_is_empty:
        raise ValueError(
            "sequence_parallel splits an attention model's fresh prefill: pass an empty dense cache "
            "(ssm_llm.init_cache(...)); later steps run without it"
        )
