"""Prefill straight into a compressed cache: full attention over the prompt, then the policy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssm_llm.cache import init_cache
from ssm_llm.kv.policy import CompressedCache, KVPolicy, compress_cache, describe, memory_bound, prompt_lengths
from ssm_llm.memory import check_fits
from ssm_llm.models import attention_lm
from ssm_llm.models.lm_head import activation_dtype, logits_from_hidden


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_len", "impl", "cache_dtype", "sparse_prefill"))
def _prefill(params, config, tokens, counts, policy, max_len, impl, cache_dtype, sparse_prefill=None):
    cache = init_cache(config, tokens.shape[0], tokens.shape[1], cache_dtype)
    if policy.observation_window:
        # A window past the prompt observes every query: the same observation, in T rows rather than W.
        window = min(policy.observation_window, tokens.shape[1])
        h, cache, observation = attention_lm.prefill_observed(
            params, config, tokens, cache, counts, window, impl, sparse_prefill
        )
    else:
        h, cache = attention_lm.hidden_states(
            params, config, tokens, cache, counts, impl, cache_is_empty=True, sparse_prefill=sparse_prefill
        )
        observation = None
    last = jnp.take_along_axis(h, (counts - 1)[:, None, None], axis=1)[:, 0]
    return logits_from_hidden(params, config, last), compress_cache(config, cache, policy, max_len, observation)


def prefill(
    params: dict,
    config,
    tokens,
    policy: KVPolicy,
    max_len: int,
    *,
    token_counts=None,
    impl: str = "auto",
    sparse_prefill=None,
) -> tuple[jax.Array, CompressedCache]:
    """Prefill `tokens: [B, T]` (right-padded; `token_counts: [B]` real tokens per row, default T) with
    full attention, then compress the cache with `policy` (giving it the last prompt queries it needs).

    Returns the next-token logits `[B, V]` of each row's last real token and a `CompressedCache` with
    room to decode `max_len - T` tokens per row with `ssm_llm.forward`. `sparse_prefill` (e.g.
    `kv.MInference()`): the prompt's attention on that method's sparse pattern instead of full attention.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, steps] with steps >= 1, got shape {tokens.shape}")
    counts = (
        jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        if token_counts is None
        else jnp.asarray(token_counts, jnp.int32)
    )
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"policy must be a KV policy from ssm_llm.kv, got {policy!r}")
    policy.check(config, prompt_lengths(counts, tokens.shape[1]))  # each row's length is known here, not in the jit
    dtype = activation_dtype(params)
    check_fits(
        f"kv_compression={describe(policy)} with max_len={max_len}",
        memory_bound(config, policy, tokens.shape[0], tokens.shape[1], max_len, dtype),
    )
    return _prefill(params, config, tokens, counts, policy, max_len, impl, activation_dtype(params), sparse_prefill)
