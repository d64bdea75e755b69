"""StreamingLLM (sinks + ring window) and the KV-compression protocol it runs on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kv_checks import assert_decode_matches

import ssm_llm
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv import CompressedCache, StreamingLLM, cache_bytes, compress_cache
from ssm_llm.kv.policy import rope_frequencies
from ssm_llm.kv.slots import SlotKV

CONFIG = ssm_llm.ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
PARAMS = ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))
PROMPTS = [[5, 9, 13, 2, 77, 31, 8, 40, 3, 61, 12], [7, 70, 4]]


def dense_and_compressed(policy, prompt, max_len):
    tokens = jnp.asarray([prompt])
    _, prefill = ssm_llm.forward(PARAMS, CONFIG, tokens, ssm_llm.init_cache(CONFIG, 1, len(prompt)))
    _, dense = ssm_llm.forward(PARAMS, CONFIG, tokens, ssm_llm.init_cache(CONFIG, 1, max(max_len, len(prompt))))
    return dense, compress_cache(CONFIG, prefill, policy, max_len)


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_no_eviction_gives_the_full_cache_logits(positions):
    policy = StreamingLLM(budget=64, positions=positions)
    dense, compressed = dense_and_compressed(policy, PROMPTS[0], 64)
    assert_decode_matches(PARAMS, CONFIG, dense, compressed, [3, 50, 21, 9], atol=2e-6)
    full = ssm_llm.generate(PARAMS, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=12))
    streamed = ssm_llm.generate(
        PARAMS, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=12, kv_compression=policy)
    )
    assert streamed.tokens == full.tokens


def test_ring_keeps_sinks_and_the_latest_window():
    policy = StreamingLLM(budget=8, sinks=2)
    _, cache = dense_and_compressed(policy, PROMPTS[0], 32)
    assert isinstance(cache, CompressedCache) and cache.capacity == 8
    kept = lambda c: sorted(np.asarray(c.data.pos)[0, 0, 0].tolist())  # noqa: E731
    assert kept(cache) == [0, 1, 5, 6, 7, 8, 9, 10]  # 11 prompt tokens: sinks 0-1 + the last 6
    for step in range(9):
        _, cache = ssm_llm.forward(PARAMS, CONFIG, jnp.asarray([[step + 1]]), cache)
        n = 12 + step
        assert kept(cache) == [0, 1] + list(range(n - 6, n))
        assert int(cache.used[0]) == 8 and int(cache.lengths[0]) == n
    # every layer and kv head holds the same tokens
    pos = np.asarray(cache.data.pos)
    assert (pos == pos[:1, :, :1]).all()


def numpy_rope(x, positions, inv_freq):
    angles = positions[..., None].astype(np.float64) * inv_freq
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


@pytest.mark.parametrize("positions,ceiling", [("cache", None), ("original", None), ("original", 5), ("cache", 3)])
def test_one_step_matches_numpy(positions, ceiling):
    """A decode step after 20 tokens (budget 9, 2 sinks): token 20 overwrites 13 in the ring and attends to
    sinks 0-1, tokens 14-19 and itself, rotated at their cache ranks or original positions, distances capped
    by the ceiling."""
    policy = StreamingLLM(budget=9, sinks=2, positions=positions, distance_ceiling=ceiling)
    rng = np.random.default_rng(0)
    B, H, Hkv, D, S = 1, 4, 2, 16, 9
    kept = np.array([0, 1] + list(range(13, 20)))  # before this step
    slot = np.asarray(policy.slot_of(jnp.asarray(kept)))
    keys, values = rng.normal(size=(len(kept), Hkv, D)), rng.normal(size=(len(kept), Hkv, D))
    k_store, v_store, pos = np.zeros((1, B, Hkv, S, D)), np.zeros((1, B, Hkv, S, D)), np.full((1, B, Hkv, S), -1)
    k_store[0, 0][:, slot] = keys.transpose(1, 0, 2)
    v_store[0, 0][:, slot] = values.transpose(1, 0, 2)
    pos[0, 0][:, slot] = kept
    inv_freq = rope_frequencies(CONFIG).astype(np.float64)
    if not policy.pre_rope:  # stored keys are rotated at their original positions
        k_store[0, 0] = numpy_rope(k_store[0, 0], np.maximum(pos[0, 0], 0), inv_freq)
    data = SlotKV(jnp.asarray(k_store, jnp.float32), jnp.asarray(v_store, jnp.float32), jnp.asarray(pos, jnp.int32))
    q, k, v = rng.normal(size=(B, 1, H, D)), rng.normal(size=(B, 1, Hkv, D)), rng.normal(size=(B, 1, Hkv, D))
    p = 20
    step = AttentionStep(
        positions=jnp.asarray([[p]]),
        lengths=jnp.asarray([21]),
        token_counts=jnp.asarray([1]),
        used=jnp.asarray([9]),
        cos=None,
        sin=None,
    )
    out, data = policy.attend(
        CONFIG, data, step, jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), "xla"
    )

    visible = np.array([0, 1] + list(range(14, 21)))  # token 13 was overwritten by 20
    all_k = np.concatenate([keys, k[0]])[np.isin(np.append(kept, p), visible)]
    all_v = np.concatenate([values, v[0]])[np.isin(np.append(kept, p), visible)]
    if positions == "cache":
        key_pos, q_pos = np.arange(len(visible)), len(visible) - 1
    else:
        key_pos, q_pos = visible, p
    if ceiling is not None:
        key_pos = q_pos - np.minimum(q_pos - key_pos, ceiling)
    rot_k = numpy_rope(all_k.transpose(1, 0, 2), np.broadcast_to(key_pos, (Hkv, len(visible))), inv_freq)
    rot_q = numpy_rope(q[0, 0], np.full(H, q_pos), inv_freq)
    want = np.zeros((H, D))
    for h in range(H):
        s = rot_k[h // 2] @ rot_q[h] / np.sqrt(D)
        w = np.exp(s - s.max())
        want[h] = (w / w.sum()) @ all_v[:, h // 2]
    np.testing.assert_allclose(np.asarray(out[0, 0]), want, atol=2e-5)
    assert sorted(np.asarray(data.pos)[0, 0, 0].tolist()) == visible.tolist()


def test_generates_past_the_model_context_without_nan():
    policy = StreamingLLM(budget=16, sinks=4)
    result = ssm_llm.generate(
        PARAMS, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=300, kv_compression=policy)
    )
    assert [len(t) for t in result.tokens] == [300, 300]  # 128-position model, 16-slot cache
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        ssm_llm.generate(
            PARAMS,
            CONFIG,
            PROMPTS,
            ssm_llm.GenerationConfig(max_new_tokens=300, kv_compression=StreamingLLM(budget=16, positions="original")),
        )


def test_cache_bytes_shrink_with_the_budget():
    _, small = dense_and_compressed(StreamingLLM(budget=8), PROMPTS[0], 128)
    dense = ssm_llm.init_cache(CONFIG, 1, 128)
    # k, v: 8 of 128 slots; plus 4-byte positions per slot and the counters
    assert cache_bytes(small) == 2 * 2 * 2 * 8 * 16 * 4 + 2 * 2 * 8 * 4 + 2 * 4
    assert cache_bytes(dense) / cache_bytes(small) > 12


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0), "budget must be an int >= 1"),
        (dict(budget=-3), "budget"),
        (dict(budget=2.5), "budget"),
        (dict(budget=8, sinks=8), "sinks .8. must be smaller than budget"),
        (dict(budget=8, sinks=-1), "sinks"),
        (dict(budget=8, positions="rope"), "positions must be one of"),
        (dict(budget=8, distance_ceiling=0), "distance_ceiling"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingLLM(**kwargs)


def test_misuse_is_reported():
    with pytest.raises(ValueError, match="kv_compression must be None or a policy"):
        ssm_llm.GenerationConfig(kv_compression="snapkv")
    _, cache = dense_and_compressed(StreamingLLM(budget=8), PROMPTS[0], 32)
    with pytest.raises(ValueError, match="decodes one token per sequence"):
        ssm_llm.forward(PARAMS, CONFIG, jnp.asarray([[1, 2]]), cache)
    mamba = ssm_llm.MambaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, state_size=4)
    mamba_params = ssm_llm.init_params(mamba, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="kv_compression compresses attention caches"):
        ssm_llm.generate(
            mamba_params,
            mamba,
            [[1, 2]],
            ssm_llm.GenerationConfig(max_new_tokens=2, kv_compression=StreamingLLM(budget=8)),
        )


@pytest.mark.slow  # 240 sampled tokens (CI time); CI checks StreamingLLM past the context exactly in
# tests/generation/test_generation_claims.py
def test_smollm2_streams_fluently_past_its_cache(smollm2):
    """SmolLM2 with a 48-slot cache writes 240 tokens: no NaN, no collapse into repeated garbage, and the
    text stays about as likely under the full model as text written with the full cache."""
    config, params, tokenizer, _ = smollm2
    prompt = tokenizer("The history of the printing press begins").input_ids
    gen = dict(max_new_tokens=240, temperature=0.7, top_p=0.9, seed=3, eos_token_ids=())
    streamed = ssm_llm.generate(
        params, config, [prompt], ssm_llm.GenerationConfig(**gen, kv_compression=StreamingLLM(budget=48, sinks=4))
    )
    full = ssm_llm.generate(params, config, [prompt], ssm_llm.GenerationConfig(**gen))

    def full_model_nll(new):
        ids = jnp.asarray([prompt + new])
        logits, _ = ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, 1, ids.shape[1]))
        logp = jax.nn.log_softmax(logits[0, len(prompt) - 1 : -1], axis=-1)
        return float(-jnp.take_along_axis(logp, jnp.asarray(new)[:, None], axis=-1).mean())

    tokens = streamed.tokens[0]
    assert len(tokens) == 240
    tail = tokens[-120:]  # well past the 48-slot cache
    fourgrams = [tuple(tail[i : i + 4]) for i in range(len(tail) - 3)]
    assert len(set(fourgrams)) / len(fourgrams) > 0.6, tokenizer.decode(tail)
    nll_streamed, nll_full = full_model_nll(tokens), full_model_nll(full.tokens[0])
    assert np.isfinite(nll_streamed) and nll_streamed < nll_full + 1.0, (nll_streamed, nll_full)
