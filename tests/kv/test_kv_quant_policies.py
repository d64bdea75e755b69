"""Quantized KV policies (KIVI, RotateKV, importance-aware mixed precision): 16 bits is the full cache;
8 bits stays close to it; the stored cache is within each bit width's error bound; bytes shrink by the
exact expected ratios; each method's math matches a plain numpy computation; bad options raise."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ssm_llm
from ssm_llm.cache import KVCache
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.hadamard import fwht
from ssm_llm.kv import cache_bytes, compress_cache, dequantize
from ssm_llm.kv.kivi import KIVI
from ssm_llm.kv.mixed_precision import MixedPrecisionKV, attention_importance
from ssm_llm.kv.policy import PrefillObservation, rope_frequencies
from ssm_llm.kv.quantization import group_view, quantize
from ssm_llm.kv.rotate_kv import RotateKV, rotate_heads, unrotate_heads
from ssm_llm.models import attention_lm
from ssm_llm.rope import rotate

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
PROMPTS = [[5, 9, 13, 2, 77, 31, 8, 40, 3, 61, 12, 44, 18, 91, 27, 60, 33, 2, 71, 15, 9, 88], [7, 70, 4]]
MAX_LEN, STEPS = 48, 16


# --- model-level helpers: one compiled program per policy (prefill, compress, scanned decode) ---------------
# LLVM optimization level 0 halves these programs' compile time (which dominates this file); the programs
# are tiny, so run time does not matter.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _padded(prompts):
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def dense_greedy(tokens, counts):
    """The full cache's greedy decode: fed tokens [B, STEPS] and each step's logits [STEPS, B, V]."""
    cache = ssm_llm.init_cache(CONFIG, tokens.shape[0], MAX_LEN)
    logits, cache = ssm_llm.forward(PARAMS, CONFIG, tokens, cache, token_counts=counts)
    first = jnp.argmax(jnp.take_along_axis(logits, (counts - 1)[:, None, None], axis=1)[:, 0], -1)

    def step(carry, _):
        tok, cache = carry
        logits, cache = ssm_llm.forward(PARAMS, CONFIG, tok[:, None], cache)
        return (jnp.argmax(logits[:, 0], -1), cache), (tok, logits[:, 0])

    _, (fed, logits) = jax.lax.scan(step, (first, cache), None, length=STEPS)
    return fed.T, logits


@functools.partial(jax.jit, static_argnames=("policy", "config", "max_len"), compiler_options=FAST_COMPILE)
def compressed_logits(tokens, counts, fed, policy, params=PARAMS, config=CONFIG, max_len=MAX_LEN):
    """Logits [N, B, V] of the compressed cache of the prompts `tokens: [B, S]` (`counts` real tokens each),
    teacher-forced with `fed: [B, N]`."""
    window = policy.observation_window or 1
    cache = ssm_llm.init_cache(config, tokens.shape[0], tokens.shape[1], params["embed"].dtype)
    _, cache, observation = attention_lm.prefill_observed(params, config, tokens, cache, counts, window, "xla")
    cache = compress_cache(config, cache, policy, max_len, observation)

    def step(cache, tok):
        logits, cache = ssm_llm.forward(params, config, tok[:, None], cache)
        return cache, logits[:, 0]

    return jax.lax.scan(step, cache, fed.T)[1]


@functools.lru_cache(maxsize=None)
def full_greedy():
    return dense_greedy(*_padded(PROMPTS))


@pytest.mark.parametrize(
    "policy",
    [
        KIVI(bits=16),
        RotateKV(bits=16, group_size=16, head_group=2),
        MixedPrecisionKV(high_bits=16, low_bits=2, important=1.0, window=4),  # every token read from its 16-bit copy
    ],
    ids=["kivi", "rotatekv", "mixed"],
)
def test_16_bits_is_the_full_cache(policy):
    fed, want = full_greedy()
    got = compressed_logits(*_padded(PROMPTS), fed, policy)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # greedy decoding on the compressed cache picks the same tokens (ragged batch)
    np.testing.assert_array_equal(jnp.argmax(got[:-1], -1).T, fed[:, 1:])


@pytest.mark.parametrize(
    "policy",
    [
        KIVI(bits=8, group_size=8, residual=16),  # the 22-token prompt quantizes 8 tokens, decoding flushes 2 groups
        RotateKV(bits=8, group_size=16, sinks=2),
        MixedPrecisionKV(high_bits=8, low_bits=8, window=4),
    ],
    ids=["kivi", "rotatekv", "mixed"],
)
def test_8_bits_stays_close_to_the_full_cache(policy):
    fed, want = full_greedy()
    got = compressed_logits(*_padded(PROMPTS), fed, policy)
    diff = float(jnp.max(jnp.abs(got - want)))  # measured: KIVI 5e-4, RotateKV 1.7e-3, mixed 9e-4 (|logits| <= 0.66)
    assert 0 < diff < 0.01 * float(jnp.max(jnp.abs(want))), diff


@pytest.mark.slow
def test_generate_with_each_policy_matches_full_greedy_at_8_bits():
    full = ssm_llm.generate(PARAMS, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=12))
    for policy in [
        KIVI(bits=8, group_size=8, residual=16),
        RotateKV(bits=8, group_size=16),
        MixedPrecisionKV(high_bits=8, low_bits=4, window=4),
    ]:
        config = ssm_llm.GenerationConfig(max_new_tokens=12, kv_compression=policy)
        assert ssm_llm.generate(PARAMS, CONFIG, PROMPTS, config).tokens == full.tokens, policy


# --- synthetic caches: numpy references, error bounds, bytes -------------------------------------------------


def numpy_rope(x, positions, inv_freq):
    angles = np.asarray(positions)[..., None].astype(np.float64) * inv_freq
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def numpy_quantize(x, bits, group, axis):
    """Plain asymmetric min/max quantization of x [..., S, D] (float32) -> x_hat."""
    x = np.asarray(x, np.float32)
    shape = x.shape
    g = (
        x.reshape(*shape[:-2], shape[-2] // group, group, shape[-1])
        if axis == "tokens"
        else x.reshape(*shape[:-1], shape[-1] // group, group)
    )
    red = -2 if axis == "tokens" else -1
    low, high = g.min(red, keepdims=True), g.max(red, keepdims=True)
    scale = (high - low) / np.float32(2**bits - 1)
    codes = np.clip(np.round((g - low) / np.where(scale > 0, scale, 1)), 0, 2**bits - 1)
    return (codes * scale + low).reshape(shape)


def numpy_attention(q, keys, values, visible):
    """q [H_q, D] (rotated), keys/values [H_kv, S, D], visible [S] -> [H_q, D]."""
    heads, kv_heads = q.shape[0], keys.shape[0]
    out = np.zeros(q.shape)
    for h in range(heads):
        kh = h // (heads // kv_heads)
        s = keys[kh] @ q[h] / np.sqrt(q.shape[-1])
        w = np.where(visible, np.exp(s - s[visible].max()), 0)
        out[h] = (w / w.sum()) @ values[kh]
    return out


def dataclass_config(**changes):
    return dataclasses.replace(CONFIG, **changes)


def synthetic_cache(lengths, seq, config=CONFIG, seed=0, outliers=True):
    """Random post-RoPE keys (with two outlier channels, as real keys have) and values."""
    rng = np.random.default_rng(seed)
    shape = (config.num_layers, len(lengths), config.num_kv_heads, seq, config.head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    if outliers:
        k[..., [1, 6]] *= 12.0
    v = rng.standard_normal(shape).astype(np.float32)
    return KVCache(k=jnp.asarray(k), v=jnp.asarray(v), lengths=jnp.asarray(lengths, jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_len"), compiler_options=FAST_COMPILE)
def compress(cache, policy, max_len, observation=None, config=CONFIG):
    return compress_cache(config, cache, policy, max_len, observation)


@functools.partial(jax.jit, static_argnames=("policy",), compiler_options=FAST_COMPILE)
def view(policy, data, lengths):
    """Layer 0 of a compressed cache's data as attention sees it: keys, values [B, H_kv, S, D], positions."""
    return policy.view(CONFIG, data, 0, lengths)


def step_inputs(batch, seed=1):
    rng = np.random.default_rng(seed)
    """Random q [B, 1, H_q, D], k, v [B, 1, H_kv, D] of one new token."""
    heads = (CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.num_kv_heads)
    return [rng.standard_normal((batch, 1, h, CONFIG.head_dim)).astype(np.float32) for h in heads]


@functools.partial(jax.jit, static_argnames=("policy",), compiler_options=FAST_COMPILE)
def attend(policy, data, q, k, v, lengths_before):
    """One decode step of layer 0 at positions `lengths_before: [B]` (as many slots in use)."""
    n = jnp.asarray(lengths_before, jnp.int32)
    step = AttentionStep(positions=n[:, None], lengths=n + 1, token_counts=jnp.ones_like(n), used=n, cos=None, sin=None)
    return policy.attend(CONFIG, data, step, q, k, v, "xla")


def test_kivi_matches_numpy_and_flushes_a_group():
    """Rows of 23 and 13 tokens, group 8, residual 16: row 0 holds tokens 0-7 quantized (q(23) = 8), and its
    next token fills the residual, so tokens 8-15 are quantized too; row 1 stays in full precision."""
    policy = KIVI(bits=2, group_size=8, residual=16)
    cache = synthetic_cache([23, 13], 24)
    data = compress(cache, policy, 32).data
    np.testing.assert_array_equal(policy.quantized_tokens(jnp.asarray([23, 13, 24, 32, 7])), [8, 0, 16, 24, 0])
    q, k, v = step_inputs(2)
    out, data = attend(policy, data, q, k, v, jnp.asarray([23, 13]))

    inv_freq = rope_frequencies(CONFIG).astype(np.float64)
    keys, values, pos = view(policy, data, jnp.asarray([24, 14]))
    for row, (n, quantized) in enumerate([(24, 16), (14, 0)]):
        k_all = np.asarray(cache.k[0, row, :, :n], np.float64).copy()
        v_all = np.asarray(cache.v[0, row, :, :n], np.float64).copy()
        k_all[:, n - 1] = numpy_rope(k[row, 0], np.full(2, n - 1), inv_freq)
        v_all[:, n - 1] = v[row, 0]
        k_all[:, :quantized] = numpy_quantize(k_all[:, :quantized], 2, 8, "tokens")
        v_all[:, :quantized] = numpy_quantize(v_all[:, :quantized], 2, 8, "channels")  # 8-channel groups
        order = np.asarray(pos[row, 0])
        assert sorted(order[order >= 0].tolist()) == list(range(n))
        seen = order >= 0
        np.testing.assert_allclose(np.asarray(keys[row])[:, seen], k_all[:, order[seen]], atol=1e-5)
        np.testing.assert_allclose(np.asarray(values[row])[:, seen], v_all[:, order[seen]], atol=1e-5)
        q_rot = numpy_rope(q[row, 0], np.full(4, n - 1), inv_freq)
        want = numpy_attention(q_rot, k_all, v_all, np.ones(n, bool))
        np.testing.assert_allclose(np.asarray(out[row, 0]), want, atol=1e-5)


def test_kivi_decoding_equals_compressing_the_longer_prompt():
    """Prefill 17 / 9 tokens, decode to 40 / 32 (several flushes, ragged): the cache then holds exactly what
    compressing the 40 / 32-token prompt gives."""
    policy = KIVI(bits=2, group_size=8, residual=16)
    full = synthetic_cache([40, 32], 40, seed=3)
    inv_freq = rope_frequencies(CONFIG)
    data = compress(full.replace(lengths=jnp.asarray([17, 9])), policy, 40).data
    q = jnp.zeros((2, 1, 4, 16))
    for t in range(23):
        n = np.asarray([17 + t, 9 + t])
        k_post = jnp.take_along_axis(full.k[0], jnp.asarray(n)[:, None, None, None], axis=2)[:, :, 0]
        k_pre = rotate(k_post, -jnp.asarray(n)[:, None], inv_freq)  # attend takes keys before RoPE
        v = jnp.take_along_axis(full.v[0], jnp.asarray(n)[:, None, None, None], axis=2)[:, :, 0]
        data = attend(policy, data, q, k_pre[:, None], v[:, None], jnp.asarray(n))[1]
    lengths = jnp.asarray([40, 32])
    got_k, got_v, got_pos = view(policy, data, lengths)
    want_k, want_v, want_pos = view(policy, compress(full, policy, 40).data, lengths)
    np.testing.assert_array_equal(got_pos, want_pos)
    seen = np.asarray(want_pos)[..., None] >= 0  # empty slots hold stale data
    np.testing.assert_allclose(np.where(seen, got_k, 0), np.where(seen, want_k, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(seen, got_v, 0), np.where(seen, want_v, 0), atol=1e-5)


def test_hadamard_is_orthogonal_and_spreads_outliers():
    fast_fwht = jax.jit(fwht, compiler_options=FAST_COMPILE)
    for n in (1, 2, 16, 64):
        h = np.asarray(fast_fwht(jnp.eye(n)))
        np.testing.assert_allclose(h, scipy.linalg.hadamard(n) / np.sqrt(n), atol=1e-6)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 16))  # [B, H, S, D]: grouped-head round trip
    round_trip = jax.jit(lambda x: unrotate_heads(rotate_heads(x, 2), 2), compiler_options=FAST_COMPILE)
    np.testing.assert_allclose(round_trip(x), x, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two length, got 24"):
        fwht(jnp.zeros((3, 24)))
    # Keys with outlier channels: the rotated 2-bit per-token error is far below the unrotated one.
    keys = synthetic_cache([64], 64, config=dataclass_config(head_dim=64)).k
    plain, rotated = np.asarray(rotation_rmse(keys))
    assert rotated < 0.6 * plain, (rotated, plain)  # measured: 1.2 vs 3.0


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def rotation_rmse(keys):
    """RMS error of 2-bit per-token quantization (one group per 64-channel token) without / with rotation."""
    rmse = lambda x: jnp.sqrt(jnp.mean((x - keys) ** 2))  # noqa: E731
    return (
        rmse(dequantize(quantize(keys, 2, 64, "channels"))),
        rmse(fwht(dequantize(quantize(fwht(keys), 2, 64, "channels")))),
    )


def test_rotate_kv_matches_numpy():
    """Rotated pre-RoPE keys (heads 0-1 rotated together), rotated values, per-token 2-bit groups of 16,
    2 sinks in full precision; then one decode step of a 21 / 6-token ragged batch."""
    policy = RotateKV(bits=2, group_size=16, sinks=2, head_group=2)
    cache = synthetic_cache([21, 6], 22, seed=5)
    data = compress(cache, policy, 32).data
    q, k, v = step_inputs(2, seed=6)
    out, data = attend(policy, data, q, k, v, jnp.asarray([21, 6]))

    inv_freq = rope_frequencies(CONFIG).astype(np.float64)
    had16, had32 = scipy.linalg.hadamard(16) / 4.0, scipy.linalg.hadamard(32) / np.sqrt(32)
    keys, values, _ = view(policy, data, jnp.asarray([22, 7]))
    for row, n in enumerate([22, 7]):
        k_post = np.asarray(cache.k[0, row, :, :n], np.float64).copy()  # [H_kv, n, D]
        k_post[:, n - 1] = numpy_rope(k[row, 0], np.full(2, n - 1), inv_freq)
        v_all = np.asarray(cache.v[0, row, :, :n], np.float64).copy()
        v_all[:, n - 1] = v[row, 0]
        k_pre = numpy_rope(k_post, -np.arange(n)[None], inv_freq)
        wide = np.concatenate([k_pre[0], k_pre[1]], axis=-1) @ had32  # [n, 32]: both heads rotated together
        wide = numpy_quantize(wide, 2, 16, "channels") @ had32.T
        k_hat = numpy_rope(np.stack([wide[:, :16], wide[:, 16:]]), np.arange(n)[None], inv_freq)
        v_hat = numpy_quantize(v_all @ had16, 2, 16, "channels") @ had16.T
        k_hat[:, :2], v_hat[:, :2] = k_post[:, :2], v_all[:, :2]  # sinks
        np.testing.assert_allclose(np.asarray(keys[row, :, :n]), k_hat, atol=2e-5)
        np.testing.assert_allclose(np.asarray(values[row, :, :n]), v_hat, atol=2e-5)
        q_rot = numpy_rope(q[row, 0], np.full(4, n - 1), inv_freq)
        np.testing.assert_allclose(
            np.asarray(out[row, 0]), numpy_attention(q_rot, k_hat, v_hat, np.ones(n, bool)), atol=2e-5
        )


def test_mixed_precision_matches_numpy():
    """Importance = attention of the last 3 prompt queries (summed over the window and each kv head's query
    heads); the top 5 tokens per kv head are read at 8 bits, the others at 2 bits."""
    policy = MixedPrecisionKV(high_bits=8, low_bits=2, important=5, window=3, group_size=8)
    lengths = [14, 4]
    cache = synthetic_cache(lengths, 14, seed=7)
    rng = np.random.default_rng(8)
    queries = rng.standard_normal((2, 2, 3, 4, 16)).astype(np.float32)
    q_pos = np.asarray([[11, 12, 13], [-1, 2, 3]])
    observation = PrefillObservation(queries=jnp.asarray(queries), positions=jnp.asarray(q_pos, jnp.int32))
    compressed = compress(cache, policy, 20, observation)
    data = compressed.data
    # prompt slots: two 8-token key groups; then 6 decode slots (20 - 14)
    assert compressed.used.tolist() == [16, 16] and compressed.capacity == 16 + 6

    scores = np.asarray(attention_importance(observation.queries, observation.positions, cache.k, cache.lengths))
    k_np = np.asarray(cache.k, np.float64)
    for layer in range(2):
        for row, n in enumerate(lengths):
            for kv in range(2):
                want = np.zeros(n)
                for w in range(3):
                    if q_pos[row, w] < 0:
                        continue
                    for g in range(2):
                        s = k_np[layer, row, kv, : q_pos[row, w] + 1] @ queries[layer, row, w, 2 * kv + g] / 4.0
                        p = np.exp(s - s.max())
                        want[: len(p)] += p / p.sum()
                np.testing.assert_allclose(scores[layer, row, kv, :n], want, rtol=1e-5, atol=1e-6)
                assert np.all(np.isneginf(scores[layer, row, kv, n:]))
                kept = np.asarray(data.high_pos[layer, row, kv])
                assert set(kept[kept >= 0].tolist()) == set(np.argsort(-want)[:5].tolist())

    keys, values, pos = view(policy, data, None)
    for row, n in enumerate(lengths):
        padded = np.asarray(cache.k[0, row])[:, np.minimum(np.arange(16), n - 1)]  # last real token repeated
        low = numpy_quantize(padded, 2, 8, "tokens")
        for kv in range(2):
            kept = [p for p in np.asarray(data.high_pos[0, row, kv]).tolist() if p >= 0]
            want = low[kv].copy()
            want[kept] = numpy_quantize(np.asarray(cache.k[0, row, kv])[kept], 8, 8, "channels")
            np.testing.assert_allclose(np.asarray(keys[row, kv, :n]), want[:n], atol=1e-5)
        assert np.asarray(pos[row, 0, :16]).tolist() == list(range(n)) + [-1] * (16 - n)


def bound_excess(x, q):
    """max(|x - x_hat| - scale / 2) over a QuantizedTensor's elements (with float32 slack): <= 0 within bound."""
    err, _ = group_view(jnp.abs(jnp.asarray(x, jnp.float32) - dequantize(q)), q.group_size, q.axis)
    return jnp.max(err - q.scale / 2 - 1e-6 * (q.scale * ((1 << q.bits) - 1) + jnp.abs(q.zero)))


@functools.partial(jax.jit, static_argnames=("bits",), compiler_options=FAST_COMPILE)
def stored_bound_excesses(cache, queries, bits):
    """Compress `cache` with each policy at `bits` and compare every stored QuantizedTensor with what it
    quantized: KIVI's keys/values, RotateKV's rotated pre-RoPE keys and rotated values, mixed precision's
    low-bit prompt and high-bit copies."""
    kivi = compress_cache(CONFIG, cache, KIVI(bits=bits, group_size=8, residual=8), 32).data
    pad = [(0, 0)] * 3 + [(0, 2), (0, 0)]  # 32 quantized slots: 30 tokens + zero padding
    out = [bound_excess(jnp.pad(cache.k, pad), kivi.keys), bound_excess(jnp.pad(cache.v, pad), kivi.values)]

    rot = compress_cache(CONFIG, cache, RotateKV(bits=bits, group_size=8, sinks=3, head_group=2), 30).data
    pre = rotate(cache.k[:, :, :, 3:], -jnp.arange(3, 30), rope_frequencies(CONFIG))
    out += [bound_excess(rotate_heads(pre, 2), rot.keys), bound_excess(fwht(cache.v[:, :, :, 3:]), rot.values)]

    policy = MixedPrecisionKV(high_bits=bits, low_bits=bits, important=6, window=2, group_size=8)
    observation = PrefillObservation(queries, jnp.asarray([[28, 29], [17, 18]]))
    mixed = compress_cache(CONFIG, cache, policy, 40, observation).data
    fill = jnp.minimum(jnp.arange(32)[None, :], cache.lengths[:, None] - 1)[None, :, None, :, None]
    padded = jnp.take_along_axis(cache.k, jnp.broadcast_to(fill, (2, 2, 2, 32, 16)), axis=3)
    important = jnp.take_along_axis(cache.k, jnp.maximum(mixed.high_pos, 0)[..., None], axis=3)
    return jnp.stack(out + [bound_excess(padded, mixed.low_k), bound_excess(important, mixed.high_k)])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stored_codes_are_within_the_bit_width_bound(bits):
    cache = synthetic_cache([30, 19], 30, seed=bits)
    queries = jax.random.normal(jax.random.PRNGKey(bits), (2, 2, 2, 4, 16))
    excess = np.asarray(stored_bound_excesses(cache, queries, bits))
    assert np.all(excess <= 0), excess


def test_cache_bytes_shrink_by_the_expected_ratio():
    """A 1000-token prompt, 64-wide heads (SmolLM2's), 2-bit codes; float32 dense cache of 1024 slots."""
    config = dataclass_config(head_dim=64)
    cache = synthetic_cache([1000], 1000, config=config, outliers=False)
    L, B, H, D = 2, 1, 2, 64
    dense = cache_bytes(ssm_llm.init_cache(config, 1, 1024))
    assert dense == 2 * L * B * H * 1024 * D * 4 + 4
    counters = 2 * B * 4  # lengths, used

    # KIVI: 1024 quantized slots (codes D/4 bytes, key scale+zero per channel per 32 tokens, value
    # scale+zero per 32 channels of each token) plus a 32-token float residual.
    kivi = compress(cache, KIVI(bits=2, group_size=32, residual=32), 1024, config=config)
    per_token = 2 * D // 4 + 2 * 4 * D // 32 + 2 * 4 * D // 32
    assert cache_bytes(kivi) == L * B * H * (1024 * per_token + 2 * 32 * D * 4) + counters
    assert dense / cache_bytes(kivi) == pytest.approx(6.4, abs=1e-3)

    # RotateKV: per-token codes with one scale+zero per 64 channels, 4 float sinks.
    rot = compress(cache, RotateKV(bits=2, group_size=64, sinks=4), 1024, config=config)
    assert cache_bytes(rot) == L * B * H * (1020 * 2 * (D // 4 + 2 * 4) + 2 * 4 * D * 4) + counters
    assert dense / cache_bytes(rot) == pytest.approx(10.28, abs=0.01)

    # Mixed precision: 1024 prompt slots at 2 bits (as KIVI), 200 important tokens at 8 bits (per-token
    # groups of 32 channels) with int32 positions, 24 float decode slots with positions, prompt lengths.
    observation = PrefillObservation(
        jax.random.normal(jax.random.PRNGKey(0), (L, B, 8, 4, D)), jnp.arange(992, 1000)[None]
    )
    mixed = compress(
        cache, MixedPrecisionKV(high_bits=8, low_bits=2, important=0.2, window=8), 1024, observation, config=config
    )
    high = 200 * (2 * (D + 2 * 4 * D // 32) + 4)
    tail = 24 * (2 * D * 4 + 4)
    assert cache_bytes(mixed) == L * B * H * (1024 * per_token + high + tail) + B * 4 + counters
    assert dense / cache_bytes(mixed) == pytest.approx(4.73, abs=0.01)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: KIVI(bits=3), r"KIVI: bits must be one of \(2, 4, 8, 16\).*got 3"),
        (lambda: KIVI(bits=4.0), "bits must be one of"),
        (lambda: KIVI(group_size=0), "group_size must be an int >= 1"),
        (lambda: KIVI(group_size=32, residual=48), r"residual \(48\) must be a multiple of group_size \(32\)"),
        (lambda: KIVI(residual=0), "residual must be an int >= 1"),
        (lambda: RotateKV(bits=1), "RotateKV: bits must be one of"),
        (lambda: RotateKV(sinks=-1), "sinks must be an int >= 0"),
        (lambda: RotateKV(head_group=0), "head_group must be an int >= 1"),
        (lambda: RotateKV(group_size=2.5), "group_size"),
        (lambda: MixedPrecisionKV(high_bits=6), "high_bits must be one of"),
        (lambda: MixedPrecisionKV(high_bits=4, low_bits=8), r"low_bits \(8\) must not exceed high_bits \(4\)"),
        (lambda: MixedPrecisionKV(important=0), "important must be an int >= 1, got 0"),
        (lambda: MixedPrecisionKV(important=1.5), r"fractional important must lie in \(0, 1\], got 1.5"),
        (lambda: MixedPrecisionKV(important="20%"), "important must be an int >= 1"),
        (lambda: MixedPrecisionKV(window=0), "window must be an int >= 1"),
    ],
)
def test_bad_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_options_that_do_not_fit_the_model_raise():
    cache = synthetic_cache([8], 8)
    with pytest.raises(ValueError, match=r"channels axis \(16\) must be a multiple of group_size \(12\)"):
        compress_cache(CONFIG, cache, KIVI(bits=2, group_size=12, residual=12), 8)
    with pytest.raises(ValueError, match=r"head_group \(3\) must divide the model's 2 kv heads"):
        compress_cache(CONFIG, cache, RotateKV(head_group=3), 8)
    wide = dataclass_config(head_dim=24, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"head_group \* head_dim \(1 \* 24\) must be a power of two"):
        compress_cache(wide, synthetic_cache([8], 8, config=wide), RotateKV(), 8)
    with pytest.raises(ValueError, match="scores tokens by the last 32 prompt queries"):
        compress_cache(CONFIG, cache, MixedPrecisionKV(), 8)


TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith from "
    "Mainz, combined movable metal type, oil-based ink and a wooden screw press into a system that could produce "
    "books quickly and cheaply. Before his invention, books were copied by hand, usually by monks working in "
    "scriptoria, and a single volume could take months to finish. The new presses spread rapidly across Europe: by "
    "1500, more than two hundred cities had print shops, and millions of books had been printed. The consequences "
    "were profound. Scholars could compare identical copies of texts, errors could be corrected in later editions, "
    "and ideas travelled faster than ever."
)


@pytest.mark.slow
def test_smollm2_quantized_caches_track_the_full_model(smollm2):
    """A 96-token prompt compressed, then 40 teacher-forced tokens: next-token agreement with the full cache and
    KL(full || compressed). Measured (CPU): KIVI 2-bit agree 0.80 KL 0.13; RotateKV 4-bit 0.97 / 0.027; mixed
    8/2-bit 0.93 / 0.021. The rotation cuts 2-bit per-token key error on these real keys by ~30% (1.33 -> 0.91)."""
    config, params, tokenizer, _ = smollm2
    ids = tokenizer(TEXT).input_ids
    assert len(ids) == 136
    full, dense = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 136))
    want = jax.nn.log_softmax(full[0, 96:], axis=-1)  # predictions after each fed token
    prompt, fed = jnp.asarray([ids[:96]]), jnp.asarray([ids[96:]])
    for policy, min_agree, max_kl in [
        (KIVI(bits=2, group_size=32, residual=32), 0.65, 0.3),
        (RotateKV(bits=4, group_size=64), 0.85, 0.08),
        (MixedPrecisionKV(high_bits=8, low_bits=2), 0.85, 0.08),
    ]:
        got = compressed_logits(prompt, jnp.asarray([96]), fed, policy, params=params, config=config, max_len=192)
        got = jax.nn.log_softmax(got[:, 0], axis=-1)
        agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1)))
        kl = float(jnp.mean(jnp.sum(jnp.exp(want) * (want - got), -1)))
        assert agree >= min_agree and kl <= max_kl, (policy, agree, kl)

    # Pre-RoPE keys of the real cache, 2-bit per token (one group per 64-wide head): rotating first cuts the error.
    keys = rotate(dense.k, -jnp.arange(136), rope_frequencies(config))
    rmse = lambda x: float(jnp.sqrt(jnp.mean((x - keys) ** 2)))  # noqa: E731
    plain = rmse(dequantize(quantize(keys, 2, 64, "channels")))
    rotated = rmse(fwht(dequantize(quantize(fwht(keys), 2, 64, "channels"))))
    assert rotated < 0.8 * plain, (rotated, plain)
