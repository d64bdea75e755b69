"""SnapKV / PyramidKV: the same kept tokens as NVIDIA kvpress on SmolLM2, scores against plain numpy,
PyramidKV layer budgets, ragged batches, no-compression identity, memory, and option checks."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kv_checks import assert_decode_matches

import ssm_llm
from ssm_llm.kv import StreamingLLM, cache_bytes, compress_cache
from ssm_llm.kv.snapkv import SnapKV
from ssm_llm.models.attention_lm import prefill_observed

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
KVPRESS = Path(__file__).parent / "data" / "kvpress_selection.json"
jit_prefill = jax.jit(prefill_observed, static_argnames=("config", "window", "impl"))
jit_compress = jax.jit(compress_cache, static_argnames=("config", "policy", "max_len"))


def prefill(prompts, window, config=CONFIG, params=PARAMS, width=None):
    """A ragged prefill right-padded to `width` (default: the longest prompt): (dense cache,
    observation of the last `window` queries)."""
    width = width or max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    _, cache, observation = jit_prefill(
        params, config, jnp.asarray(tokens), ssm_llm.init_cache(config, len(prompts), width), lengths, window
    )
    return cache, observation


def kept_sets(cache):
    """[layer][row][kv head] -> the set of original positions held by a compressed cache."""
    pos = np.asarray(cache.data.pos)
    return [[[set(h[h >= 0].tolist()) for h in row] for row in layer] for layer in pos]


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


RAGGED = random_prompts([40, 25, 3])  # the last row is shorter than the 4-token window


@pytest.fixture(scope="module")
def ragged():
    """The ragged batch prefilled with a 4-token observation window."""
    return prefill(RAGGED, 4)


@pytest.fixture(scope="module")
def single():
    """RAGGED[0] alone (40 tokens), prefilled with a 4-token observation window."""
    return prefill(RAGGED[:1], 4)


def test_selection_equals_kvpress_on_smollm2(smollm2):
    """Replays the prompt recorded by experiments/kvpress_selection.py (kvpress 0.5.5, transformers,
    float32): our SnapKV (avg pooling) and StreamingLLM (original positions) keep exactly kvpress's
    SnapKVPress / StreamingLLMPress token sets in every layer and KV head. kvpress's compression_ratio r
    keeps int(n * (1 - r)) tokens, the window included."""
    config, params, _, _ = smollm2
    record = json.loads(KVPRESS.read_text())
    ids = record["prompt_ids"]
    window = {run["params"]["window_size"] for run in record["runs"] if run["press"] == "SnapKVPress"}.pop()
    cache, observation = prefill([ids], window, config, params)
    for run in record["runs"]:
        options = run["params"]
        if run["press"] == "SnapKVPress":
            policy = SnapKV(
                run["n_kept"], window=options["window_size"], kernel_size=options["kernel_size"], pooling="avg"
            )
        else:
            policy = StreamingLLM(run["n_kept"], sinks=options["n_sink"], positions="original")
        ours = jit_compress(config, cache, policy, len(ids), observation)
        got = [layer[0] for layer in kept_sets(ours)]
        want = [[set(head) for head in layer] for layer in run["kept"]]
        assert len(want) == config.num_layers and all(len(layer) == config.num_kv_heads for layer in want)
        differing = [
            (layer, head)
            for layer in range(config.num_layers)
            for head in range(config.num_kv_heads)
            if got[layer][head] != want[layer][head]
        ]
        assert not differing, (run["press"], options, differing)


def numpy_scores(keys, queries, q_positions, length, window, kernel_size, pooling):
    """Plain numpy SnapKV scores of one sequence and layer. keys: [H_kv, S, D]; queries: [W, H_q, D]."""
    kv_heads, _, dim = keys.shape
    group = queries.shape[1] // kv_heads
    prefix = length - window
    pad = kernel_size // 2
    out = np.zeros((kv_heads, keys.shape[1]))
    for kv in range(kv_heads):
        for h in range(kv * group, (kv + 1) * group):
            attn, count = np.zeros(max(prefix, 0)), 0
            for q, p in zip(queries[:, h], q_positions, strict=True):
                if p < 0:
                    continue
                logits = keys[kv, : p + 1] @ q / np.sqrt(dim)
                weights = np.exp(logits - logits.max())
                attn += (weights / weights.sum())[: max(prefix, 0)]
                count += 1
            attn /= count
            padded = np.concatenate([np.zeros(pad), attn, np.zeros(pad)])
            windows = [padded[s : s + kernel_size] for s in range(len(attn))]
            pooled = [w.max() if pooling == "max" else w.sum() / kernel_size for w in windows]
            out[kv, : len(attn)] += np.asarray(pooled) / group
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_scores_and_selection_match_numpy(ragged, pooling):
    """Ragged rows of 40, 25 and 3 tokens: scores equal a plain numpy computation, and each head keeps
    its window plus its top (budget - window) prefix tokens (a row within the budget keeps everything)."""
    policy = SnapKV(budget=12, window=4, kernel_size=5, pooling=pooling)
    cache, observation = ragged
    scores = np.asarray(jax.jit(SnapKV.scores, static_argnums=0)(policy, cache, observation))
    kept = kept_sets(jit_compress(CONFIG, cache, policy, 44, observation))
    k, q, qpos = (np.asarray(x, np.float64) for x in (cache.k, observation.queries, observation.positions))
    for layer in range(CONFIG.num_layers):
        for row, prompt in enumerate(RAGGED):
            n = len(prompt)
            want = numpy_scores(k[layer, row], q[layer, row], qpos[row].astype(int), n, 4, 5, pooling)
            np.testing.assert_allclose(scores[layer, row], want, atol=1e-6, rtol=1e-5)
            for head in range(CONFIG.num_kv_heads):
                if n <= policy.budget:
                    expected = set(range(n))
                else:
                    best = np.argsort(-want[head, : n - 4], kind="stable")[: policy.budget - 4]
                    expected = set(best.tolist()) | set(range(n - 4, n))
                assert kept[layer][row][head] == expected, (layer, row, head)


@pytest.mark.parametrize(
    "policy",
    [SnapKV(budget=64, window=4), SnapKV(budget=1.0, window=4), SnapKV(budget=1000, window=4, pyramid=True, beta=3.0)],
)
def test_no_eviction_gives_the_full_cache_logits(single, policy):
    cache, observation = single
    compressed = jit_compress(CONFIG, cache, policy, 48, observation)
    _, dense = ssm_llm.forward(PARAMS, CONFIG, jnp.asarray(RAGGED[:1]), ssm_llm.init_cache(CONFIG, 1, 48))
    assert_decode_matches(PARAMS, CONFIG, dense, compressed, [3, 50, 21, 9], atol=1e-5)


def test_no_eviction_generates_the_full_cache_tokens():
    """A ragged batch whose second prompt (3 tokens) is shorter than the window."""
    full = ssm_llm.generate(PARAMS, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=12))
    snapped = ssm_llm.generate(
        PARAMS,
        CONFIG,
        PROMPTS,
        ssm_llm.GenerationConfig(max_new_tokens=12, kv_compression=SnapKV(budget=1.0, window=4)),
    )
    assert snapped.tokens == full.tokens


@pytest.mark.parametrize("budget,window,beta", [(100, 32, 20.0), (50, 32, 20.0), (17, 4, 3.0), (10, 10, 5.0)])
def test_pyramid_budgets(budget, window, beta):
    """Layer budgets fall linearly from bottom = w + (2 - 1/beta) m to top = w + m / beta (m = budget - w),
    every layer keeps the window, and the mean is exactly the budget."""
    policy = SnapKV(budget=budget, window=window, pyramid=True, beta=beta)
    m = budget - window
    for layers in (1, 2, 5, 30):
        b = np.asarray(policy.layer_budgets(budget, layers))
        assert b.shape == (layers,) and b.sum() == budget * layers, b
        assert (np.diff(b) <= 0).all() and (b >= window).all()
        if layers > 1:
            assert abs(b[0] - (window + (2 - 1 / beta) * m)) <= 0.5 and abs(b[-1] - (window + m / beta)) <= 0.5
    assert policy.kept_slots(1000) == int(np.asarray(policy.layer_budgets(budget, 30))[0])
    flat = SnapKV(budget=budget, window=window)
    assert (np.asarray(flat.layer_budgets(budget, 30)) == budget).all()


def test_pyramid_compress_keeps_layer_budgets(ragged):
    """2 layers, budget 16, window 4, beta 3: m = 12, so layers keep 4 + 20 and 4 + 4 tokens; the
    slots are sized for the bottom layer and the upper layer leaves its extra slots empty."""
    policy = SnapKV(budget=16, window=4, pyramid=True, beta=3.0)
    cache, observation = ragged
    compressed = jit_compress(CONFIG, cache, policy, 48, observation)
    assert compressed.capacity == 24 + 48 - 40
    counts = (np.asarray(compressed.data.pos) >= 0).sum(-1)  # [L, B, H_kv]
    assert (counts[0] == np.array([24, 24, 3])[:, None]).all()
    assert (counts[1] == np.array([8, 8, 3])[:, None]).all()
    assert np.asarray(compressed.used).tolist() == [24, 24, 3]


def test_ragged_rows_compress_and_decode_like_single_rows(ragged):
    """In a ragged batch each row keeps what it would keep alone, decoded tokens are appended at each
    row's own slot, and the logits equal the row decoded alone."""
    policy = SnapKV(budget=12, window=4)
    cache, observation = ragged
    batched = jit_compress(CONFIG, cache, policy, 44, observation)
    assert np.asarray(batched.used).tolist() == [12, 12, 3]
    singles = []
    for row, prompt in enumerate(RAGGED):
        c, o = prefill([prompt], policy.window, width=40)
        singles.append(jit_compress(CONFIG, c, policy, 44, o))
        assert [layer[row] for layer in kept_sets(batched)] == [layer[0] for layer in kept_sets(singles[row])]
    for step in range(3):
        tokens = [11 + step, 40 + step, 90 - step]
        logits, batched = ssm_llm.forward(PARAMS, CONFIG, jnp.asarray(tokens)[:, None], batched)
        for row in range(len(RAGGED)):
            want, singles[row] = ssm_llm.forward(PARAMS, CONFIG, jnp.asarray([[tokens[row]]]), singles[row])
            np.testing.assert_allclose(logits[row], want[0], atol=1e-5, rtol=0)
    pos = np.asarray(batched.data.pos)
    for row, (prompt, used) in enumerate(zip(RAGGED, [12, 12, 3], strict=True)):
        n = len(prompt)
        assert (pos[:, row, :, used : used + 3] == np.arange(n, n + 3)).all()
    assert np.asarray(batched.used).tolist() == [15, 15, 6]


def test_cache_bytes_shrink_with_the_budget(single):
    cache, observation = single
    small = jit_compress(CONFIG, cache, SnapKV(budget=8, window=4), 40, observation)
    dense = ssm_llm.init_cache(CONFIG, 1, 40)
    assert small.capacity == 8
    # k, v: 8 slots of 16 floats per layer and kv head; 4-byte positions per slot; the counters
    assert cache_bytes(small) == 2 * 2 * 2 * 8 * 16 * 4 + 2 * 2 * 8 * 4 + 2 * 4
    assert cache_bytes(dense) / cache_bytes(small) > 4.8  # 40 / 8 tokens, less the positions' bytes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0), "budget must be an int >= 1"),
        (dict(budget=-3), "budget"),
        (dict(budget=1.5), "fractional budget must lie in"),
        (dict(budget=0.0), "fractional budget"),
        (dict(budget=True), "budget"),
        (dict(budget=16, window=0), "window must be an int >= 1"),
        (dict(budget=16, window=32), r"window \(32\) must not exceed budget \(16\)"),
        (dict(budget=64, kernel_size=4), "kernel_size must be odd"),
        (dict(budget=64, kernel_size=0), "kernel_size"),
        (dict(budget=64, pooling="mean"), "pooling must be one of"),
        (dict(budget=64, pyramid="yes"), "pyramid must be True or False"),
        (dict(budget=64, pyramid=True, beta=0.5), "beta must be a number >= 1"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapKV(**kwargs)


def test_needs_the_observation(single):
    cache, _ = single
    with pytest.raises(ValueError, match="scores tokens by the last 32 prompt queries"):
        compress_cache(CONFIG, cache, SnapKV(budget=64), 40)
