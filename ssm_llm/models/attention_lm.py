"""Decoder-only attention language models: Llama, Qwen2 (q/k/v bias), Mistral (sliding window), SmolLM2.

Pure functions over a params dict. Per-layer weights are either stacked on a leading layer axis and
scanned with `lax.scan` (compile time does not grow with depth), or a list of per-layer dicts run as
an unrolled loop (faster on CPU; see `ssm_llm.layer_layout`). Linear weights are stored `[in, out]`
so a projection is `x @ w`.

params = {
  "embed": [V, H], "final_norm": [H], "lm_head": [H, V] (untied models only),
  "layers": {"attn_norm": [L, H], "wq": [L, H, Hq*D], "wk"/"wv": [L, H, Hkv*D], "wo": [L, Hq*D, H],
             "bq"/"bk"/"bv" (qkv_bias), "bo" (o_bias), "mlp_norm": [L, H], "w_gate"/"w_up": [L, H, I],
             "w_down": [L, I, H], "b_gate"/"b_up"/"b_down" (mlp_bias)},
}
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from pallas_kernels.cache_attention import cache_attention
from pallas_kernels.cpu_int8_dot import BlockedInt8Weight
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.quantized_matmul import QuantizedWeight
from ssm_llm.cache import KVCache
from ssm_llm.cache import init_cache as init_kv_cache
from ssm_llm.compressed_cache import AttentionStep, CompressedCache, PrefillObservation
from ssm_llm.config import MIXED_WEIGHT_ONLY, WEIGHT_BITS, ModelConfig
from ssm_llm.layer_layout import run_layers
from ssm_llm.models.lm_head import embed_tokens, linear
from ssm_llm.models.registry import Family, register
from ssm_llm.norm import rms_norm
from ssm_llm.rope import apply_rope, inverse_frequencies, rope_tables


def param_shapes(config: ModelConfig) -> dict:
    """The shape of every parameter, as a pytree matching `params`."""
    L, H, I, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size  # noqa: E741
    Q, KV = config.q_size, config.kv_size
    layers = {
        "attn_norm": (L, H),
        "wq": (L, H, Q),
        "wk": (L, H, KV),
        "wv": (L, H, KV),
        "wo": (L, Q, H),
        "mlp_norm": (L, H),
        "w_gate": (L, H, I),
        "w_up": (L, H, I),
        "w_down": (L, I, H),
    }
    if config.qkv_bias:
        layers.update(bq=(L, Q), bk=(L, KV), bv=(L, KV))
    if config.o_bias:
        layers.update(bo=(L, H))
    if config.mlp_bias:
        layers.update(b_gate=(L, I), b_up=(L, I), b_down=(L, H))
    # An int8 embedding is stored as the tied output projection's QuantizedWeight [H, V] (one scale per row).
    shapes = {"embed": (H, V) if config.int8_embedding else (V, H), "final_norm": (H,), "layers": layers}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (H, V)
    if config.head_residual:  # the int8 head's rounding residual, a 4-bit QuantizedWeight [H, V]
        shapes["head_residual"] = (H, V)
    return shapes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters (normal, std 0.02; norms at 1, biases small) for tests and benchmarks."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(shape, dtype) + 0.1 * jax.random.normal(k, shape, dtype))
        else:
            out.append(0.02 * jax.random.normal(k, shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty dense cache of `max_len` positions for `batch` sequences."""
    return init_kv_cache(config, batch, max_len, dtype)


def project_qkv(config: ModelConfig, p: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention inputs of one block (before RoPE): `x: [B, T, H]` and this layer's params `p` ->
    q: [B, T, Hq, D], k, v: [B, T, Hkv, D]."""
    batch, steps, _ = x.shape
    w8a8 = (config.quantization == "w8a8", config.activation_rotation, config.int8_dot)  # linear's int8 options
    h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
    q = linear(h, p["wq"], p.get("bq"), *w8a8).reshape(batch, steps, config.num_heads, config.head_dim)
    k = linear(h, p["wk"], p.get("bk"), *w8a8).reshape(batch, steps, config.num_kv_heads, config.head_dim)
    v = linear(h, p["wv"], p.get("bv"), *w8a8).reshape(batch, steps, config.num_kv_heads, config.head_dim)
    return q, k, v


def finish_block(config: ModelConfig, p: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """The rest of one block after attention: output projection, residual, MLP. `x: [B, T, H]` (the
    block's input), `attn: [B, T, Hq, D]` -> `[B, T, H]`."""
    return finish_block_with_inputs(config, p, x, attn)[0]


def finish_block_with_inputs(config: ModelConfig, p: dict, x: jax.Array, attn: jax.Array):
    """`finish_block`, also returning what its linears read: {"o_in": [B, T, Hq*D] (wo's input),
    "mlp_in": [B, T, H] (w_gate / w_up's), "down_in": [B, T, I] (w_down's)} — for calibration; under jit
    the unused ones cost nothing."""
    w8a8 = (config.quantization == "w8a8", config.activation_rotation, config.int8_dot)  # linear's int8 options
    o_in = attn.reshape(*x.shape[:2], config.q_size)
    x = x + linear(o_in, p["wo"], p.get("bo"), *w8a8)
    h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    gate = linear(h, p["w_gate"], p.get("b_gate"), *w8a8)
    up = linear(h, p["w_up"], p.get("b_up"), *w8a8)
    down_in = jax.nn.silu(gate) * up
    out = x + linear(down_in, p["w_down"], p.get("b_down"), *w8a8)
    return out, {"o_in": o_in, "mlp_in": h, "down_in": down_in}


LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the weights `quantization` applies to


def check_linear_kinds(params: dict, config: ModelConfig) -> None:
    """Raise ValueError unless every linear weight is what `config.quantization` says: float for "none",
    a `QuantizedWeight` of its bit width otherwise, of any width for "wxa16" (params quantized one way under a
    config of another)."""
    layers = params["layers"]
    for i, layer in enumerate(layers if isinstance(layers, (list, tuple)) else [layers]):
        for name in LINEARS:
            w = layer[name]
            bits = w.bits if isinstance(w, QuantizedWeight) else 8 if isinstance(w, BlockedInt8Weight) else None
            mixed = config.quantization == MIXED_WEIGHT_ONLY
            if (bits is None) if mixed else (bits != WEIGHT_BITS.get(config.quantization)):
                where = f"params['layers']{f'[{i}]' if isinstance(layers, (list, tuple)) else ''}[{name!r}]"
                got = "float weights" if bits is None else f"{bits}-bit QuantizedWeight"
                raise ValueError(
                    f"{where} holds {got}, but config.quantization is {config.quantization!r} (quantize with "
                    f"{'ssm_llm.compress.quantize_layers' if mixed else 'ssm_llm.quantize_weights'}, which returns "
                    "the matching config)"
                )
    for name in ("embed", *(() if config.tie_word_embeddings else ("lm_head",))):
        int8 = isinstance(params[name], (QuantizedWeight, BlockedInt8Weight))
        if int8 != config.int8_embedding:
            raise ValueError(
                f"params[{name!r}] is {'an int8' if int8 else 'a float'} "
                f"table, but config.int8_embedding is {config.int8_embedding} (quantize_weights(..., embedding=True) "
                "returns the matching config)"
            )
    if config.head_residual:
        r = params["head_residual"]
        if not (isinstance(r, QuantizedWeight) and r.bits == 4 and r.offsets is None and r.group_size == r.shape[0]):
            raise ValueError(
                "params['head_residual'] must be a symmetric 4-bit QuantizedWeight with one scale per vocabulary row "
                "(quantize_weights(..., head_residual=True) makes it)"
            )


def _dense_prefill_attention(config, q, k, v, kv, step: AttentionStep, impl: str, sequence_parallel, sparse):
    """Attention into an empty dense cache: among the new tokens only, which are then stored at
    positions 0..T-1. q, k, v rotated; kv = (k, v) `[L, B, H_kv, S, D]` of every layer. With
    `sequence_parallel` (an `ssm_llm.sharding.SequenceParallel`), RingAttention over its mesh axis; with
    `sparse` (an `ssm_llm.sparse_prefill.SparsePrefill`, e.g. `kv.MInference`), that method's sparse attention."""
    if sequence_parallel is not None:
        attn = sequence_parallel.attention(q, k, v, step.token_counts, step.window)
    elif sparse is not None:
        attn = sparse.attend(config, q, k, v, step, impl)
    else:
        attn = flash_attention(q, k, v, step.window, lengths=step.token_counts, impl=impl)
    start = (step.layer, 0, 0, 0, 0)
    k_all, v_all = (
        jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype).transpose(0, 2, 1, 3)[None], start)
        for cached, new in zip(kv, (k, v), strict=True)
    )
    return attn, (k_all, v_all)


def _dense_cache_attention(q, k, v, kv, step: AttentionStep, impl: str):
    """Attention over a dense cache holding earlier tokens: the new keys/values are scattered at each
    row's own positions (padding past the cache's end is dropped; it is never attended to)."""
    rows = jnp.arange(q.shape[0])[:, None]
    k_all, v_all = (
        cached.at[step.layer, rows, :, step.positions].set(new.astype(cached.dtype), mode="drop")
        for cached, new in zip(kv, (k, v), strict=True)
    )
    attn = cache_attention(q, k_all, v_all, step.positions, step.lengths, step.window, layer=step.layer, impl=impl)
    return attn, (k_all, v_all)


def _observe_queries(observed: jax.Array, q: jax.Array, step: AttentionStep) -> jax.Array:
    """`observed: [L, B, W, H_q, D]` with this layer's slot holding each row's last W real rotated queries."""
    window = observed.shape[2]
    last = step.token_counts[:, None] - window + jnp.arange(window)[None, :]
    rows_q = jnp.take_along_axis(q, jnp.maximum(last, 0)[:, :, None, None], axis=1)
    return observed.at[step.layer].set(rows_q.astype(observed.dtype))


def _block(config: ModelConfig, impl: str, cache_is_empty: bool, policy, sp, sparse, step: AttentionStep, carry, layer):
    """One decoder block, scanned over the layers. `carry` = (activations [B, T, H], the whole stacked
    cache — (k, v) of a dense cache, updated in place by XLA, or a compressed cache's data — and the
    observed prompt queries or None); `layer` = this layer's (params, index, sliding window); `sp` a
    `SequenceParallel` for a fresh prefill, or None; `sparse` a `SparsePrefill` for a fresh prefill, or None."""
    x, kv, observed = carry
    p, index, window = layer
    step = step.replace(layer=index, window=window)
    q, k, v = project_qkv(config, p, x)
    if policy is not None:  # a compressed cache: the policy rotates, stores and attends in its own way
        attn, kv = policy.attend(config, kv, step, q, k, v, impl)
    else:
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        if cache_is_empty:
            attn, kv = _dense_prefill_attention(config, q, k, v, kv, step, impl, sp, sparse)
        else:
            attn, kv = _dense_cache_attention(q, k, v, kv, step, impl)
        if observed is not None:
            observed = _observe_queries(observed, q, step)
    return finish_block(config, p, x, attn), kv, observed


def _run(
    params, config, tokens, cache, token_counts, impl, cache_is_empty, observe, sequence_parallel=None, sparse=None
):
    check_linear_kinds(params, config)
    if sparse is not None and (isinstance(cache, CompressedCache) or not cache_is_empty or sequence_parallel):
        raise ValueError(
            "sparse_prefill computes a fresh prefill's attention among the prompt's tokens: it needs an empty "
            "dense cache (cache_is_empty=True) and no sequence_parallel"
        )
    if sparse is not None:
        sparse.check(config)
    if sequence_parallel is not None and (isinstance(cache, CompressedCache) or not cache_is_empty):
        raise ValueError(
            "sequence_parallel splits a fresh prefill (an empty dense cache); this cache "
            + ("is compressed" if isinstance(cache, CompressedCache) else "may already hold tokens")
        )
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    lengths = cache.lengths + token_counts
    cos, sin = rope_tables(positions, inverse_frequencies(config.rope, config.head_dim))
    compressed = isinstance(cache, CompressedCache)
    policy = cache.policy if compressed else None
    step = AttentionStep(
        positions=positions,
        lengths=lengths,
        token_counts=token_counts,
        used=cache.used if compressed else lengths,
        cos=cos,
        sin=sin,
    )
    x = embed_tokens(params, config, tokens)
    kv = cache.data if compressed else (cache.k, cache.v)
    observed = None
    if observe:
        observed = jnp.zeros((config.num_layers, tokens.shape[0], observe, config.num_heads, config.head_dim), x.dtype)
    x, kv, observed = run_layers(
        lambda c, layer: _block(config, impl, cache_is_empty, policy, sequence_parallel, sparse, step, c, layer),
        (x, kv, observed),
        params["layers"],
        (config.layer_windows,),
    )
    h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if compressed:
        cache = cache.replace(data=kv, lengths=lengths, used=policy.advance(cache.used, token_counts, cache.capacity))
    else:
        cache = KVCache(k=kv[0], v=kv[1], lengths=lengths)
    return h, cache, observed


def hidden_states(
    params: dict,
    config: ModelConfig,
    tokens: jax.Array,
    cache: KVCache | CompressedCache,
    token_counts: jax.Array,
    impl: str = "auto",
    cache_is_empty: bool = False,
    sequence_parallel=None,
    sparse_prefill=None,
) -> tuple[jax.Array, KVCache]:
    """Run the decoder stack on `tokens: [B, T]` appended to `cache` (dense, or compressed by a KV policy).

    token_counts: [B], how many of each row's T tokens are real (the rest is right padding).
    cache_is_empty (static): the cache is known to hold no token (all lengths 0), so prefill attention runs
    among the new tokens only, skipping the unused cache and most of the causal mask.
    sequence_parallel (static): an `ssm_llm.sharding.SequenceParallel` — the prefill's attention as
    RingAttention over its mesh axis (needs `cache_is_empty`).
    sparse_prefill (static): an `ssm_llm.sparse_prefill.SparsePrefill` (e.g. `ssm_llm.kv.MInference`) — the
    prefill's attention computed on a sparse, per-head pattern (needs `cache_is_empty`).
    Returns the final-normed hidden states `[B, T, H]` and the cache advanced by `token_counts`.
    """
    h, cache, _ = _run(
        params, config, tokens, cache, token_counts, impl, cache_is_empty, 0, sequence_parallel, sparse_prefill
    )
    return h, cache


def prefill_observed(
    params: dict,
    config: ModelConfig,
    tokens: jax.Array,
    cache: KVCache,
    token_counts: jax.Array,
    window: int,
    impl: str = "auto",
    sparse_prefill=None,
) -> tuple[jax.Array, KVCache, PrefillObservation]:
    """A fresh prefill (empty `cache`) that also returns each row's last `window` rotated queries per
    layer, for query-aware KV compression (SnapKV & co.); `sparse_prefill` as in `hidden_states`."""
    h, cache, observed = _run(params, config, tokens, cache, token_counts, impl, True, window, None, sparse_prefill)
    last = token_counts[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :]
    return h, cache, PrefillObservation(queries=observed, positions=jnp.where(last >= 0, last, -1))


register(ModelConfig, Family("attention", sys.modules[__name__], KVCache, tree_verifier="attention"))
