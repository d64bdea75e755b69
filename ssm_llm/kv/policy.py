"""What every KV-compression policy shares: compressing a dense prefill cache, budgets, checks and the
attention of observed prompt queries. The interface itself (`KVPolicy`, `CompressedCache`,
`AttentionStep`) lives with the caches, in `ssm_llm.compressed_cache`.

A policy is a frozen dataclass (hashable, static under `jit`) holding the method's parameters, so
eviction (StreamingLLM, SnapKV), dynamic selection (TokenSelect), quantized storage (KIVI, RotateKV,
mixed precision, GEAR) and cross-layer sharing (MiniCache, xKV) are all the same option:
`GenerationConfig(kv_compression=SnapKV(budget=256))`. Keys are rotated (RoPE) at each kept token's
original position unless a method says otherwise, and `cache_bytes(cache)` measures what is stored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.cache import KVCache
from ssm_llm.compressed_cache import CompressedCache, KVPolicy, PrefillObservation
from ssm_llm.config import ModelConfig
from ssm_llm.option_spec import check_int
from ssm_llm.rope import inverse_frequencies


def observed_attention(keys, queries, q_positions):
    """The causal softmax attention that observed prompt queries pay to the keys, summed over them.

    keys: [B, H_kv, S, D] and queries: [B, W, H_q, D], both rotated; q_positions: [B, W] the queries'
    positions (-1: no query, contributes nothing). Returns [B, H_kv, G, S] float32 (G = H_q / H_kv,
    the query heads of each kv head; K/V are never repeated).
    """
    batch, kv_heads, seq, dim = keys.shape
    q = queries.reshape(batch, queries.shape[1], kv_heads, -1, dim)
    logits = jnp.einsum("bwkgd,bksd->bkgws", q, keys, preferred_element_type=jnp.float32) * dim**-0.5
    s = jnp.arange(seq)
    visible = (s[None, None, :] <= q_positions[:, :, None]) & (q_positions[:, :, None] >= 0)  # [B, W, S]
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1) * visible[:, None, None]  # rows of absent queries are 0
    return probs.sum(axis=-2)


def group_mass(grouped, centroids, sizes):
    """grouped [B, H_kv, G, D] queries (scaled), centroids [B, H_kv, C, D] (cluster means, chunk landmarks),
    sizes [B, H_kv, C] tokens each stands for -> [B, H_kv, C]: each one's estimated attention mass, softmax of
    size x exp(q . centroid) per query head, max over the kv head's query heads (size 0: mass 0; NaN where
    every size is 0)."""
    logits = jnp.einsum("bkgd,bkcd->bkgc", grouped, centroids)
    logits = jnp.where(sizes[:, :, None] > 0, logits + jnp.log(jnp.maximum(sizes, 1))[:, :, None], -jnp.inf)
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=2)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def layer_slice(tree, layer):
    """Layer `layer` of every array in a layer-stacked cache pytree (leading axis = layers)."""
    return jax.tree_util.tree_map(lambda a: a[layer], tree)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """The model's rotary inverse frequencies `[D // 2]`."""
    return inverse_frequencies(config.rope, config.head_dim)


def check_positive_int(method: str, name: str, value, minimum: int = 1) -> None:
    """A clear ValueError unless `value` is an int >= minimum (numpy ints too; bools are not ints here)."""
    check_int(method, name, value, minimum)


def check_within_context(method: str, name: str, value: int, config: ModelConfig, reason: str) -> None:
    """A clear ValueError if the size `value` exceeds the model's context (`reason`: why that is wrong)."""
    if value > config.max_position_embeddings:
        raise ValueError(
            f"{method}: {name} ({value}) exceeds the model's context of "
            f"{config.max_position_embeddings} positions: {reason}"
        )


def check_budget(method: str, budget, name: str = "budget") -> None:
    """A clear ValueError unless `budget` is a token count (an int >= 1) or a kept fraction (a float in
    (0, 1]; NaN and infinity are not)."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"{method}: a fractional {name} must lie in (0, 1], got {budget!r}")
    else:
        check_int(method, name, budget)


def resolve_budget(method: str, budget, prompt_len: int, name: str = "budget") -> int:
    """A budget (`check_budget`) -> tokens of a prompt of `prompt_len` tokens: an int is taken as it is,
    a fraction keeps round(budget * prompt_len) tokens (round half to even). A fraction that keeps no
    token (round(budget * prompt_len) < 1) is an error naming the budget, the prompt length and the
    count, never rounded up to one silently."""
    check_budget(method, budget, name)
    if not isinstance(budget, float):
        return int(budget)
    count = round(budget * prompt_len)
    if count < 1:
        raise ValueError(
            f"{method}: {name}={budget!r} keeps round({budget!r} * {prompt_len}) = {count} tokens of a "
            f"{prompt_len}-token prompt; give a larger fraction or a token count (an int >= 1)"
        )
    return count


def prompt_lengths(lengths, padded: int) -> tuple[int, ...]:
    """What `KVPolicy.check` sees: the distinct lengths of concrete `lengths: [B]`, or `(padded,)` (the
    padded prompt length) when they are traced, under jit."""
    if isinstance(lengths, jax.core.Tracer):
        return (padded,)
    return tuple(sorted({int(n) for n in np.asarray(lengths) if n > 0})) or (padded,)


def memory_bound(config: ModelConfig, policy: KVPolicy, batch: int, prompt_len: int, max_len: int, dtype) -> int:
    """An upper bound of the bytes a compressed cache needs while it is built: the dense prefill cache of
    `prompt_len` positions plus `policy.capacity` dense slots (quantized and low-rank storage is smaller), plus
    the policy's own working memory (`work_bytes`)."""
    per_slot = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * np.dtype(dtype).itemsize
    extra = policy.work_bytes(config, batch, prompt_len, max_len)
    return per_slot * (prompt_len + policy.capacity(prompt_len, max_len)) + extra


def compress_cache(
    config: ModelConfig, cache: KVCache, policy: KVPolicy, max_len: int, observation: PrefillObservation | None = None
) -> CompressedCache:
    """Compress a dense prefill `cache` with `policy`, for sequences growing up to `max_len` positions.

    Each sequence may then decode `max_len - cache.max_len` tokens (whatever its prompt length);
    `forward` raises a clear error past that, except for ring buffers (StreamingLLM) that never fill.

    `observation` (the last prompt queries, from `prefill_with_observation`) is required by policies
    with `observation_window > 0`.
    """
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"kv_compression must be a KV policy (e.g. ssm_llm.kv.StreamingLLM(...)), got {policy!r}")
    if not isinstance(cache, KVCache):
        raise TypeError(f"compress_cache needs the dense KVCache of a prefill, got {type(cache).__name__}")
    if policy.observation_window and observation is None:
        raise ValueError(
            f"{type(policy).__name__} scores tokens by the last {policy.observation_window} prompt "
            f"queries: pass observation= (or prefill with ssm_llm.kv.prefill(..., policy, ...))"
        )
    prompt_len = cache.max_len
    if max_len < prompt_len:
        raise ValueError(
            f"compress_cache: max_len ({max_len}) is smaller than the prefill cache ({prompt_len} positions)"
        )
    policy.check(config, prompt_lengths(cache.lengths, prompt_len))
    capacity = policy.capacity(prompt_len, max_len)
    data, used = policy.compress(config, cache, observation, capacity)
    return CompressedCache(data=data, lengths=cache.lengths, used=used, policy=policy, capacity=capacity)


def describe(policy: KVPolicy | None) -> str:
    """A one-line description, e.g. for experiment tables: `SnapKV(budget=256, window=32, ...)`."""
    if policy is None:
        return "full cache"
    fields = ", ".join(f"{f.name}={getattr(policy, f.name)!r}" for f in dataclasses.fields(policy))
    return f"{type(policy).__name__}({fields})"
