"""InfLLM: memory units (blocks) found through representative tokens, attended with the sinks and a local
window; against numpy, through `generate`, and on SmolLM2."""

import jax.numpy as jnp
import numpy as np
import pytest
from kv_checks import passkey_answer, passkey_prompt
from test_kv_token_select import CONFIG, attend_step, numpy_rope, random_step

import ssm_llm
from ssm_llm.compressed_cache import PrefillObservation
from ssm_llm.kv import InfLLM, StreamingLLM, cache_bytes


def observation(rng, lengths, width, heads=4, dim=16):
    """Random rotated queries of every prompt position, right-aligned as a prefill observes them."""
    positions = np.array([n - width + np.arange(width) for n in lengths])
    positions = np.where(positions >= 0, positions, -1)
    queries = rng.normal(size=(1, len(lengths), width, heads, dim))
    return PrefillObservation(jnp.asarray(queries, jnp.float32), jnp.asarray(positions, jnp.int32)), queries, positions


@pytest.mark.parametrize("window", [0, 14])
def test_one_step_matches_numpy(window):
    """Representative scores per head (prompt queries through a running sum, then the step's query on its
    local tokens), each complete unit's mean unrotated representative key per head, top units by the query
    rotated to position `local` against them, summed over heads, attention over sinks + units + local
    window and the filling block; a row short enough attends to everything."""
    policy = InfLLM(blocks=2, block_size=4, representatives=2, sinks=2, local=5)
    rng = np.random.default_rng(3)
    lengths, slots, H, D = np.array([29, 9]), 40, 4, 16
    cache, (q, k, v), (keys, values, inv_freq) = random_step(rng, lengths, slots)
    obs, queries, positions = observation(rng, lengths, slots)
    data, _ = policy.compress(CONFIG, cache, obs, slots)
    out, data = attend_step(policy, data, q, k, v, lengths, window)
    for b, p in enumerate(lengths):
        n = p + 1
        kb, vb = keys[b].copy(), values[b].copy()
        kb[:, p] = numpy_rope(k[b, 0], np.full(2, p), inv_freq)
        vb[:, p] = v[b, 0]
        qr = numpy_rope(q[b, 0], np.full(H, p), inv_freq)
        scores = np.zeros((H, slots))
        for h in range(H):
            for m in range(p):
                for w in range(slots):
                    if m < positions[b, w] <= m + policy.local:
                        scores[h, m] += queries[0, b, w, h] @ kb[h // 2, m]
            for m in range(max(p - policy.local, 0), p):
                scores[h, m] += qr[h] @ kb[h // 2, m]
        np.testing.assert_allclose(np.asarray(data.scores[0, b, :, :p]), scores[:, :p], rtol=1e-4, atol=1e-3)
        lookup_q = numpy_rope(q[b, 0], np.full(H, policy.local), inv_freq)
        if n <= policy.attended:
            attended = np.arange(n)
        else:
            done = (n - policy.local - policy.sinks) // policy.block_size
            relevance = []
            for i in range(done):
                block = policy.sinks + i * policy.block_size + np.arange(policy.block_size)
                total = 0.0
                for h in range(H):
                    reps = block[np.argsort(-scores[h, block])[: policy.representatives]]
                    unrotated = numpy_rope(kb[h // 2, reps], -reps, inv_freq)
                    total += lookup_q[h] @ unrotated.mean(0)
                relevance.append(total)
            relevance = np.array(relevance)
            if window:
                ends = policy.sinks + (np.arange(done) + 1) * policy.block_size
                relevance[ends <= n - window] = -np.inf
            top = np.argsort(-relevance)[: policy.blocks]
            units = [policy.sinks + i * policy.block_size + np.arange(policy.block_size) for i in top]
            tail = np.arange(policy.sinks + done * policy.block_size, n)
            attended = np.concatenate([np.arange(policy.sinks), *units, tail])
        if window:
            attended = attended[attended > p - window]
        want = np.zeros((H, D))
        for h in range(H):
            s = kb[h // 2, attended] @ qr[h] / np.sqrt(D)
            e = np.exp(s - s.max())
            want[h] = (e / e.sum()) @ vb[h // 2, attended]
        np.testing.assert_allclose(np.asarray(out[b, 0]), want, atol=2e-5)


def test_retrieving_everything_is_full_attention_and_keeps_every_token():
    """With room for every token InfLLM gives the full cache's greedy tokens; its cache holds every K/V (plus
    scores and unit keys), while a tight setting changes the output."""
    prompts = [[5, 9, 13, 2, 77, 31, 8, 40, 3, 61, 12, 44, 17, 90, 23, 51, 6], [7, 70, 4]]
    from test_kv_token_select import PARAMS

    def run(policy):
        gen = ssm_llm.GenerationConfig(max_new_tokens=30, eos_token_ids=(), kv_compression=policy)
        return ssm_llm.generate(PARAMS, CONFIG, prompts, gen).tokens

    full = run(None)
    assert run(InfLLM(blocks=16, block_size=4, sinks=4, local=8)) == full
    assert run(InfLLM(blocks=1, block_size=4, representatives=2, sinks=2, local=4)) != full
    policy = InfLLM(blocks=1, block_size=4, sinks=2, local=4)
    _, cache = ssm_llm.kv.prefill(PARAMS, CONFIG, [prompts[0]], policy, max_len=48)
    dense = 2 * CONFIG.num_layers * CONFIG.num_kv_heads * 48 * CONFIG.head_dim * 4
    assert dense < cache_bytes(cache) < 1.5 * dense


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocks=0), "blocks"),
        (dict(blocks=2, block_size=0), "block_size"),
        (dict(blocks=2, block_size=4, representatives=5), "must not exceed block_size"),
        (dict(blocks=2, sinks=-1), "sinks"),
        (dict(blocks=2, local=0), "local"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfLLM(**kwargs)


def test_smollm2_retrieves_a_passkey_outside_the_window(smollm2):
    """A 419-token prompt with a passkey in the middle: attending to at most 100 tokens per step, InfLLM's
    units bring the key back (the full model answers the same); a sinks + window cache of 100 cannot."""
    policy = InfLLM(blocks=3, block_size=16, sinks=4, local=32)
    assert policy.attended == 100 and len(passkey_prompt(smollm2[2])) > 400
    assert "71432" in passkey_answer(smollm2, policy)
    assert "71432" not in passkey_answer(smollm2, StreamingLLM(budget=100, sinks=4, positions="original"))
