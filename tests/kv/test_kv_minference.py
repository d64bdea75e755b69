"""MInference sparse prefill: each pattern's online index estimate against numpy, settings that keep every key
equal to full attention through `generate`, the offline pattern search, saving / loading, bad options, and a
SmolLM2 passkey with the shipped patterns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kv_checks import passkey_prompt
from test_kv_token_select import CONFIG, PARAMS

import ssm_llm
from ssm_llm.kv import MInference
from ssm_llm.kv.minference import FIRST_COLUMNS, block_sparse_indices, vertical_slash_indices
from ssm_llm.kv.minference_search import fit_patterns, layer_recalls, pattern_mask
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.models import attention_lm


def random_qk(seed, batch, steps, heads, kv_heads, dim):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, steps, heads, dim)).astype(np.float32), rng.normal(
        size=(batch, steps, kv_heads, dim)
    ).astype(np.float32)


def numpy_last_probs(q, k, count, last):
    """[H, W, T] softmax of the row's last W real queries over the keys up to each, zero elsewhere."""
    steps, heads, dim = q.shape
    rep = heads // k.shape[1]
    window = min(last, steps)
    probs = np.zeros((heads, window, steps))
    for w in range(window):
        p = count - window + w
        if p < 0:
            continue
        for h in range(heads):
            s = k[: p + 1, h // rep] @ q[p, h] / np.sqrt(dim)
            e = np.exp(s - s.max())
            probs[h, w, : p + 1] = e / e.sum()
    return probs, [count - window + w for w in range(window)]


def test_vertical_slash_estimate_matches_numpy():
    """Columns: the first 30 and the best summed softmax weights of the last queries (real keys only); blocks:
    query block - r for the relative offsets r of most diagonal mass over ((r-1)*block, (r+1)*block), r = 0, 1
    always (ragged rows)."""
    batch, steps, heads, kv_heads, dim, block, width, n_columns, last = 2, 70, 4, 2, 8, 8, 4, 36, 5
    q, k = random_qk(0, batch, steps, heads, kv_heads, dim)
    counts = np.array([70, 51])
    blocks, columns = vertical_slash_indices(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(counts), block, width, n_columns, last
    )
    blocks, columns = np.asarray(blocks), np.asarray(columns)
    n_blocks = -(-steps // block)
    for b in range(batch):
        probs, positions = numpy_last_probs(q[b], k[b], counts[b], last)
        for h in range(heads):
            vertical = probs[h].sum(0)[: counts[b]]
            best = set(range(FIRST_COLUMNS)) | set(
                (np.argsort(-vertical[FIRST_COLUMNS:])[: n_columns - FIRST_COLUMNS] + FIRST_COLUMNS).tolist()
            )
            assert set(columns[b, h].tolist()) == best
            slash = np.zeros(steps)
            for w, p in enumerate(positions):
                for s in range(p + 1):
                    slash[p - s] += probs[h, w, s]
            mass = [slash[max(0, (r - 1) * block + 1) : (r + 1) * block].sum() for r in range(n_blocks)]
            mass[0] = mass[1] = np.inf
            offsets = np.argsort(-np.asarray(mass), kind="stable")[:width]
            for i in range(n_blocks):
                want = {i - r if i - r >= 0 else -1 for r in offsets}
                assert set(blocks[b, h, i].tolist()) == want


def test_block_sparse_estimate_matches_numpy():
    """Queries and keys mean-pooled over each block's real tokens; each query block keeps its own block and its
    best-scoring earlier key blocks holding real tokens, -1 where fewer exist."""
    batch, steps, heads, kv_heads, dim, block, width = 2, 45, 4, 2, 8, 8, 3
    q, k = random_qk(1, batch, steps, heads, kv_heads, dim)
    counts = np.array([45, 20])
    got = np.asarray(block_sparse_indices(jnp.asarray(q), jnp.asarray(k), jnp.asarray(counts), block, width))
    n_blocks = -(-steps // block)
    for b in range(batch):
        n = counts[b]
        pq = [
            q[b, i * block : min((i + 1) * block, n)].mean(0) if i * block < n else np.zeros((heads, dim))
            for i in range(n_blocks)
        ]
        pk = [k[b, j * block : min((j + 1) * block, n)].mean(0) for j in range(-(-n // block))]
        for h in range(heads):
            for i in range(n_blocks):
                scores = {j: pq[i][h] @ pk[j][h // 2] for j in range(min(i + 1, len(pk)))}
                if i < len(pk):
                    scores[i] = np.inf
                ranked = sorted(scores, key=lambda j: -scores[j])[:width]
                assert set(got[b, h, i].tolist()) - {-1} == set(ranked)
                assert (got[b, h, i] == -1).sum() == width - len(ranked)


PROMPTS = [
    np.random.default_rng(0).integers(0, 97, 110).tolist(),
    np.random.default_rng(1).integers(0, 97, 77).tolist(),
]
MIXED = tuple(("a_shape", "block_sparse", "vertical_slash", "block_sparse") for _ in range(CONFIG.num_layers))
WITH_COLUMNS = tuple(("a_shape", "vertical_slash", "vertical_slash", "a_shape") for _ in range(CONFIG.num_layers))


def run(sparse, prompts=PROMPTS):
    gen = ssm_llm.GenerationConfig(max_new_tokens=12, eos_token_ids=(), sparse_prefill=sparse)
    return ssm_llm.generate(PARAMS, CONFIG, prompts, gen).tokens


def prefill_logits(sparse, prompts=PROMPTS, params=PARAMS):
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    counts = jnp.asarray([len(p) for p in prompts])
    cache = ssm_llm.init_cache(CONFIG, len(prompts), tokens.shape[1])
    h, _ = attention_lm.hidden_states(
        params, CONFIG, jnp.asarray(tokens), cache, counts, cache_is_empty=True, sparse_prefill=sparse
    )
    return np.asarray(h)


def test_settings_that_keep_every_key_are_full_attention():
    """Every column listed (A-shape and vertical-slash heads, 16-token blocks so the sparse kernel runs) or every
    block fitting the budget: the prompt's hidden states within 1e-5 of full attention's and the same greedy
    tokens (ragged rows); a real budget changes the output."""
    full, full_h = run(None), prefill_logits(None)
    for sparse in (
        MInference(block=16, blocks=2, columns=128),
        MInference(WITH_COLUMNS, block=16, blocks=2, columns=128),
        MInference(MIXED, block=16, blocks=7, columns=0),
        MInference(block=16, blocks=7),
    ):
        np.testing.assert_allclose(prefill_logits(sparse), full_h, atol=1e-5)
        assert run(sparse) == full
    assert run(MInference(MIXED, block=16, blocks=1, columns=4)) != full


def test_composes_with_kv_compression_and_speculative_decoding():
    """The sparse prefill feeds a compressed cache (SnapKV observes its last queries) and a speculative decode:
    with every key a column, each gives exactly what it gives after a full prefill."""
    from ssm_llm.speculative import PromptLookup

    exact = MInference(WITH_COLUMNS, block=16, blocks=2, columns=128)
    for option in (dict(kv_compression=ssm_llm.kv.SnapKV(budget=40, window=8)), dict(speculative=PromptLookup())):
        gen = ssm_llm.GenerationConfig(max_new_tokens=12, eos_token_ids=(), **option)
        alone = ssm_llm.generate(PARAMS, CONFIG, PROMPTS, gen).tokens
        assert ssm_llm.generate(PARAMS, CONFIG, PROMPTS, dataclasses.replace(gen, sparse_prefill=exact)).tokens == alone


def test_dense_layers_keep_full_attention_in_both_layer_layouts():
    """Layers named in dense_layers run flash attention: all of them is full attention, whether the layers are
    scanned (a traced layer index: lax.cond) or unrolled (a Python choice); some of them is in between."""
    full = run(None)
    sparse = MInference(MIXED, block=16, blocks=1, columns=4)
    all_dense = dataclasses.replace(sparse, dense_layers=tuple(range(CONFIG.num_layers)))
    np.testing.assert_allclose(prefill_logits(all_dense), prefill_logits(None), atol=1e-5)
    assert run(all_dense) == full
    first_dense = dataclasses.replace(sparse, dense_layers=(0,))
    h_stacked = prefill_logits(first_dense)
    assert not np.allclose(h_stacked, prefill_logits(None), atol=1e-3)
    assert not np.allclose(h_stacked, prefill_logits(sparse), atol=1e-3)
    unrolled = unstack_layers(PARAMS)
    np.testing.assert_allclose(prefill_logits(first_dense, params=unrolled), h_stacked, atol=1e-5)
    with pytest.raises(ValueError, match=r"dense_layers \(0, 5\) name a layer past the model's 2"):
        run(dataclasses.replace(sparse, dense_layers=(5, 0)))


def test_pattern_mask_and_recall_against_numpy():
    steps, heads, dim, block = 37, 2, 8, 8
    q, k = random_qk(2, 1, steps, heads, 1, dim)
    settings = MInference(block=block, blocks=2, columns=3, last_queries=4)
    recalls = np.asarray(layer_recalls(jnp.asarray(q[0]), jnp.asarray(k[0]), settings))
    assert recalls.shape == (heads, 3) and ((recalls > 0) & (recalls <= 1 + 1e-6)).all()
    # Against numpy for the vertical-slash pattern: the softmax weight inside its mask, averaged over queries.
    blocks, columns = vertical_slash_indices(jnp.asarray(q), jnp.asarray(k), jnp.asarray([steps]), block, 2, 3, 4)
    mask = np.asarray(pattern_mask(blocks[0], columns[0], steps, block))
    last = np.asarray(layer_recalls(jnp.asarray(q[0]), jnp.asarray(k[0]), settings, scored=10))
    for h in range(heads):
        kept = []
        for t in range(steps):
            s = k[0, : t + 1, 0] @ q[0, t, h] / np.sqrt(dim)
            p = np.exp(s - s.max())
            kept.append((p / p.sum())[mask[h, t // block, : t + 1]].sum())
        np.testing.assert_allclose(recalls[h, 1], np.mean(kept), rtol=1e-5)
        np.testing.assert_allclose(last[h, 1], np.mean(kept[-10:]), rtol=1e-5)  # only the last 10 queries
    # A budget covering every block recalls everything, whatever the pattern.
    whole = layer_recalls(jnp.asarray(q[0]), jnp.asarray(k[0]), MInference(block=block, blocks=5, columns=0))
    np.testing.assert_allclose(np.asarray(whole), 1.0, atol=1e-5)


def test_fit_patterns_picks_each_heads_best_pattern_and_round_trips(tmp_path):
    tokens = np.random.default_rng(3).integers(0, 97, 120).tolist()
    fitted, recalls = fit_patterns(PARAMS, CONFIG, tokens, MInference(block=16, blocks=2, columns=8), progress=False)
    assert recalls.shape == (CONFIG.num_layers, CONFIG.num_heads, 3)
    assert fitted.patterns == tuple(
        tuple(("a_shape", "vertical_slash", "block_sparse")[i] for i in layer.argmax(-1)) for layer in recalls
    )
    fitted.save(tmp_path / "patterns.json", model="tiny")
    loaded = MInference.load(tmp_path / "patterns.json")
    assert loaded == fitted and hash(loaded) == hash(fitted)
    assert MInference.load(tmp_path / "patterns.json", blocks=3).blocks == 3
    assert len(run(fitted)[0]) == 12


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block=0), "block"),
        (dict(blocks=0), "blocks"),
        (dict(columns=-1), "columns"),
        (dict(last_queries=0), "last_queries"),
        (dict(patterns=(("vertical_slash", "dense"),)), r"unknown pattern\(s\) \['dense'\]"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MInference(**kwargs)


def test_misuse_is_refused_by_name():
    with pytest.raises(ValueError, match="patterns are given for 1 layers x 2 heads; this model has 2 layers x 4"):
        run(MInference(patterns=(("a_shape", "a_shape"),)))
    with pytest.raises(ValueError, match="sparse_prefill must be None or a sparse prefill method"):
        ssm_llm.GenerationConfig(sparse_prefill="minference")
    mamba = ssm_llm.MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_layers=1, intermediate_size=64)
    mamba_params = ssm_llm.init_params(mamba, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sparse_prefill sparsifies attention; MambaConfig models have none"):
        ssm_llm.generate(mamba_params, mamba, [[1, 2, 3]], ssm_llm.GenerationConfig(sparse_prefill=MInference()))
    from ssm_llm.sharding import SequenceParallel

    ring = SequenceParallel(jax.make_mesh((1, 1), ("data", "seq")))
    with pytest.raises(ValueError, match="sequence_parallel and sparse_prefill are two ways to run a long prefill"):
        gen = ssm_llm.GenerationConfig(max_new_tokens=2, sparse_prefill=MInference())
        ssm_llm.generate(PARAMS, CONFIG, PROMPTS, gen, sequence_parallel=ring)
    cache = ssm_llm.init_cache(CONFIG, 1, 8)
    with pytest.raises(ValueError, match="sparse_prefill computes a fresh prefill's attention"):
        attention_lm.hidden_states(
            PARAMS, CONFIG, jnp.ones((1, 4), jnp.int32), cache, jnp.array([4]), sparse_prefill=MInference()
        )


def test_smollm2_finds_a_passkey_through_a_sparse_prefill(smollm2):
    """A 1,715-token passkey prompt, every head vertical-slash at a budget well under the prompt (4 blocks of 64
    + 64 columns per query block of 27) with layer 0 dense: the same answer as full attention (with layer 0
    sparse too, this budget loses it: SmolLM2's first layer attends broadly). The shipped patterns fit SmolLM2."""
    config, params, tokenizer, _ = smollm2
    prompt = passkey_prompt(tokenizer, 35)
    assert len(prompt) == 1715
    sparse = MInference(blocks=4, columns=64, dense_layers=(0,))
    gen = ssm_llm.GenerationConfig(max_new_tokens=8, sparse_prefill=sparse)
    assert "71432" in tokenizer.decode(ssm_llm.generate(params, config, [prompt], gen).tokens[0])
    fitted = MInference.fitted("SmolLM2-135M-Instruct")
    fitted.check(config)
    assert (fitted.block, fitted.blocks, fitted.columns) == (64, 8, 256)
    with pytest.raises(ValueError, match=r"no MInference patterns shipped for 'Llama-9B' \(shipped: \['SmolLM2"):
        MInference.fitted("Llama-9B")
