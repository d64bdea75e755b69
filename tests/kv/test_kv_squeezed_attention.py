"""Squeezed Attention: k-means clusters of the prompt's keys, looked up by centroid per step; against numpy,
through `generate`, and on SmolLM2."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_token_select import CONFIG, attend_step, numpy_rope, random_step

import ssm_llm
from ssm_llm.kv import SqueezedAttention, StreamingLLM
from ssm_llm.kv.squeezed_attention import spherical_kmeans


def test_kmeans_finds_separated_directions():
    """Keys around 4 well-separated directions (with lengths that vary) fall into 4 clusters of the right
    members; invalid keys get -1; each centroid is its members' mean key."""
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(16, 4)))[0].T  # 4 orthonormal directions
    truth = rng.integers(0, 4, 60)
    keys = directions[truth] * rng.uniform(0.5, 3, (60, 1)) + 0.05 * rng.normal(size=(60, 16))
    valid = np.arange(60) < 50
    cluster, centroids, sizes = map(np.asarray, spherical_kmeans(jnp.asarray(keys), jnp.asarray(valid), 4, 8))
    assert (cluster[50:] == -1).all()
    pairs = {(t, c) for t, c in zip(truth[:50], cluster[:50], strict=True)}
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # one cluster per direction
    for c in range(4):
        np.testing.assert_allclose(centroids[c], keys[:50][cluster[:50] == c].mean(0), rtol=1e-4, atol=1e-5)
        assert sizes[c] == (cluster == c).sum()


@pytest.mark.parametrize("window", [0, 20])
def test_one_step_matches_numpy(window):
    """Per query head softmax of size x exp(q . centroid / sqrt(D)) over clusters, max over each kv head's
    query heads, the budget's best fixed-context tokens by their cluster's mass (ties by position), attended
    with the prompt's last `local` tokens and the new one (ragged rows, optional sliding window)."""
    policy = SqueezedAttention(budget=7, clusters=4, local=3)
    rng = np.random.default_rng(6)
    lengths, slots, H, Hkv, D = np.array([29, 17]), 32, 4, 2, 16
    cache, (q, k, v), (keys, values, inv_freq) = random_step(rng, lengths, slots)
    data, _ = policy.compress(CONFIG, cache, None, slots + 4)
    out, _ = attend_step(policy, data, q, k, v, lengths, window)
    cluster, centroids, sizes = (np.asarray(x[0]) for x in (data.cluster, data.centroids, data.sizes))
    for b, n in enumerate(lengths):
        p = n
        qr = numpy_rope(q[b, 0], np.full(H, p), inv_freq)
        new_k = numpy_rope(k[b, 0], np.full(Hkv, p), inv_freq)
        for kv in range(Hkv):
            fixed = n - policy.local
            assert (cluster[b, kv, :fixed] >= 0).all() and (cluster[b, kv, fixed:] == -1).all()
            for c in range(policy.clusters):
                members = cluster[b, kv] == c
                assert sizes[b, kv, c] == members.sum()
                if members.any():
                    np.testing.assert_allclose(centroids[b, kv, c], keys[b, kv, :slots][members].mean(0), atol=1e-5)
            mass = np.zeros(policy.clusters)
            for g in (2 * kv, 2 * kv + 1):
                logits = np.where(sizes[b, kv] > 0, centroids[b, kv] @ qr[g] / np.sqrt(D), -np.inf)
                e = sizes[b, kv] * np.exp(logits - logits.max())
                mass = np.maximum(mass, e / e.sum())
            rank = mass[cluster[b, kv, :fixed]]
            chosen = np.argsort(-rank, kind="stable")[: policy.budget]
            pos = np.concatenate([chosen, np.arange(fixed, n)])
            kk = np.concatenate([keys[b, kv, pos], new_k[kv][None]])
            vv = np.concatenate([values[b, kv, pos], v[b, 0, kv][None]])
            pos = np.append(pos, p)
            seen = pos > p - window if window else np.ones(len(pos), bool)
            for h in (2 * kv, 2 * kv + 1):
                s = kk[seen] @ qr[h] / np.sqrt(D)
                e = np.exp(s - s.max())
                np.testing.assert_allclose(np.asarray(out[b, 0, h]), (e / e.sum()) @ vv[seen], atol=2e-5)


def test_a_budget_over_the_fixed_context_is_full_attention():
    from test_kv_token_select import PARAMS

    prompts = [np.random.default_rng(0).integers(0, 97, 40).tolist(), [7, 70, 4]]

    def run(policy):
        gen = ssm_llm.GenerationConfig(max_new_tokens=20, eos_token_ids=(), kv_compression=policy)
        return ssm_llm.generate(PARAMS, CONFIG, prompts, gen).tokens

    full = run(None)
    assert run(SqueezedAttention(budget=64, clusters=4, local=4)) == full
    assert run(SqueezedAttention(budget=2, clusters=4, local=2)) != full


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0, clusters=4), "budget"),
        (dict(budget=8, clusters=0), "clusters"),
        (dict(budget=8, clusters=4, local=-1), "local"),
        (dict(budget=8, clusters=4, iterations=0), "iterations"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SqueezedAttention(**kwargs)


def test_smollm2_retrieves_a_passkey_outside_the_window(smollm2):
    """A 419-token prompt with a passkey in the middle: 64 fixed-context tokens per step from 32 clusters per
    kv head, beside the last 32 prompt tokens, find the key; a sinks + window cache of the same size cannot."""
    config, params, tokenizer, _ = smollm2
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = (
        filler * 8
        + "The pass key is 71432. Remember it. 71432 is the pass key. "
        + filler * 8
        + "What is the pass key? The pass key is"
    )
    prompt = tokenizer(text).input_ids

    def answer(policy):
        gen = ssm_llm.GenerationConfig(max_new_tokens=8, kv_compression=policy)
        return tokenizer.decode(ssm_llm.generate(params, config, [prompt], gen).tokens[0])

    assert "71432" in answer(SqueezedAttention(budget=64, clusters=32, local=32))
    assert "71432" not in answer(StreamingLLM(budget=96, sinks=4, positions="original"))
