"""ShadowKV: low-rank pre-RoPE keys, chunk landmarks, static outlier chunks and top-k chunks per step; against
numpy, through `generate`, and on SmolLM2."""

import numpy as np
import pytest
from kv_checks import passkey_answer
from test_kv_token_select import CONFIG, attend_step, numpy_rope, random_step

import ssm_llm
from ssm_llm.kv import ShadowKV, StreamingLLM, cache_bytes


@pytest.mark.parametrize("window", [0, 20])
def test_one_step_matches_numpy(window):
    """Landmarks (chunk means of rotated keys), outliers (lowest min cosine to their landmark, per kv head),
    per-head softmax over the other chunks' landmarks, max over each kv head's query heads, the top chunks
    rebuilt from a rank-r SVD of the pre-RoPE keys and rotated, attended with the outliers, the prompt's local
    tail and the new token (ragged rows, optional sliding window)."""
    policy = ShadowKV(budget=8, chunk_size=2, rank=12, local_chunks=2, outlier_chunks=2)
    rng = np.random.default_rng(5)
    lengths, slots, H, Hkv, D = np.array([29, 21]), 32, 4, 2, 16
    cache, (q, k, v), (keys, values, inv_freq) = random_step(rng, lengths, slots)
    data, _ = policy.compress(CONFIG, cache, None, slots + 4)
    out, _ = attend_step(policy, data, q, k, v, lengths, window)
    cs = policy.chunk_size
    for b, n in enumerate(lengths):
        p = n  # the new token's position
        pre = np.stack([numpy_rope(keys[b, h, :n], -np.arange(n), inv_freq) for h in range(Hkv)])  # [H_kv, n, D]
        flat = np.zeros((slots, Hkv * D))
        flat[:n] = pre.transpose(1, 0, 2).reshape(n, Hkv * D)
        left, s, right = np.linalg.svd(flat, full_matrices=False)
        low = ((left[:, : policy.rank] * s[: policy.rank]) @ right[: policy.rank]).reshape(slots, Hkv, D)
        qr = numpy_rope(q[b, 0], np.full(H, p), inv_freq)
        new_k = numpy_rope(k[b, 0], np.full(Hkv, p), inv_freq)
        chunks = n // cs - policy.local_chunks
        for h in range(H):
            kv = h // 2
            ck = keys[b, kv, : chunks * cs].reshape(chunks, cs, D)
            marks = ck.mean(1)
            norms = np.linalg.norm(ck, axis=-1) * np.linalg.norm(marks, axis=-1)[:, None]
            cos = (ck @ marks[:, :, None])[..., 0] / norms
            outliers = np.argsort(cos.min(1))[: policy.outlier_chunks]
            rest = np.setdiff1d(np.arange(chunks), outliers)
            score = np.full(chunks, -1.0)
            for g in (2 * kv, 2 * kv + 1):
                logits = marks[rest] @ numpy_rope(q[b, 0, g], p, inv_freq) / np.sqrt(D)
                e = np.exp(logits - logits.max())
                score[rest] = np.maximum(score[rest], e / e.sum())
            chosen = np.argsort(-score)[: policy.budget // cs]
            rebuilt = np.concatenate([c * cs + np.arange(cs) for c in chosen])
            outlier_pos = np.concatenate([c * cs + np.arange(cs) for c in outliers])
            exact = np.concatenate([outlier_pos, np.arange(chunks * cs, n)])
            kk = np.concatenate([keys[b, kv, exact], numpy_rope(low[rebuilt, kv], rebuilt, inv_freq), new_k[kv][None]])
            pos = np.concatenate([exact, rebuilt, [p]])
            vv = np.concatenate([values[b, kv, pos[:-1]], v[b, 0, kv][None]])
            seen = pos > p - window if window else np.ones(len(pos), bool)
            logits = kk[seen] @ qr[h] / np.sqrt(D)
            e = np.exp(logits - logits.max())
            want = (e / e.sum()) @ vv[seen]
            np.testing.assert_allclose(np.asarray(out[b, 0, h]), want, atol=5e-5, rtol=1e-4)


def test_exact_keys_and_a_whole_budget_are_full_attention():
    """rank=None and a budget over every chunk give the full cache's greedy tokens; a rank-8 SVD and a tight
    budget change them; the low-rank cache stores fewer key bytes than exact keys."""
    from test_kv_token_select import PARAMS

    prompts = [np.random.default_rng(0).integers(0, 97, 40).tolist(), [7, 70, 4]]

    def run(policy):
        gen = ssm_llm.GenerationConfig(max_new_tokens=20, eos_token_ids=(), kv_compression=policy)
        return ssm_llm.generate(PARAMS, CONFIG, prompts, gen).tokens

    full = run(None)
    assert run(ShadowKV(budget=64, chunk_size=4, rank=None, local_chunks=1, outlier_chunks=1)) == full
    assert run(ShadowKV(budget=4, chunk_size=2, rank=4, local_chunks=1, outlier_chunks=1)) != full
    exact, low = (
        cache_bytes(ssm_llm.kv.prefill(PARAMS, CONFIG, [prompts[0]], ShadowKV(budget=8, rank=r), max_len=64)[1])
        for r in (None, 8)
    )
    assert low < exact


def test_offloaded_values_live_on_the_host_and_change_nothing():
    """offload_values keeps the value cache in pinned_host memory through prefill and cached decode steps
    (layers stacked and unstacked), with the same logits and greedy tokens as the on-device cache."""
    import dataclasses

    import jax.numpy as jnp
    from test_kv_token_select import PARAMS

    from ssm_llm.layer_layout import unstack_layers

    prompts = [np.random.default_rng(1).integers(0, 97, 40).tolist(), [7, 70, 4, 9]]
    policy = ShadowKV(budget=8, chunk_size=4, rank=8, local_chunks=1, outlier_chunks=1)
    offload = dataclasses.replace(policy, offload_values=True)
    tokens = np.zeros((2, 40), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    counts = jnp.array([len(p) for p in prompts])
    for params in (PARAMS, unstack_layers(PARAMS)):
        (logits, cache), (want_logits, want_cache) = (
            ssm_llm.kv.prefill(params, CONFIG, tokens, p, max_len=64, token_counts=counts) for p in (offload, policy)
        )
        assert cache.data.v.sharding.memory_kind == "pinned_host"
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(want_logits))
        for token in (3, 50, 8):
            step = jnp.full((2, 1), token)
            (logits, cache), (want_logits, want_cache) = (
                ssm_llm.forward(params, CONFIG, step, c) for c in (cache, want_cache)
            )
            np.testing.assert_array_equal(np.asarray(logits), np.asarray(want_logits))
        assert cache.data.v.sharding.memory_kind == "pinned_host"
        np.testing.assert_array_equal(np.asarray(cache.data.v), np.asarray(want_cache.data.v))

    def run(p):
        gen = ssm_llm.GenerationConfig(max_new_tokens=12, eos_token_ids=(), kv_compression=p)
        return ssm_llm.generate(PARAMS, CONFIG, prompts, gen).tokens

    assert run(offload) == run(policy)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0), "budget"),
        (dict(budget=12, chunk_size=8), "multiple of chunk_size"),
        (dict(budget=16, rank=0), "rank"),
        (dict(budget=16, local_chunks=-1), "local_chunks"),
        (dict(budget=16, outlier_chunks=-1), "outlier_chunks"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShadowKV(**kwargs)


def test_a_rank_wider_than_the_keys_is_refused():
    with pytest.raises(ValueError, match="exceeds the keys' width"):
        ssm_llm.kv.prefill(
            ssm_llm.init_params(CONFIG, __import__("jax").random.key(0)), CONFIG, [[1, 2, 3]], ShadowKV(16, rank=33), 8
        )


def test_smollm2_retrieves_a_passkey_outside_the_window(smollm2):
    """A 419-token prompt with a passkey in the middle: with rank-96 keys (half of SmolLM2's 192-wide keys)
    and 48 rebuilt tokens per step besides its exact ones (4 outlier chunks, the local tail), ShadowKV
    answers; a sinks + window cache of the same size cannot."""
    policy = ShadowKV(budget=48, chunk_size=8, rank=96, local_chunks=4, outlier_chunks=4)
    assert "71432" in passkey_answer(smollm2, policy)
    assert "71432" not in passkey_answer(smollm2, StreamingLLM(budget=48 + 9 * 8, sinks=4, positions="original"))
