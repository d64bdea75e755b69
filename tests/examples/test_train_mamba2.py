"""experiments/train_mamba2.py and experiments/text_corpus.py on tiny models and a small corpus (the first
~100 KB of Python's language reference): the loss falls, a stopped and resumed run equals a straight
one bit for bit, the export reloads and gives the training model's logits, and the corpus split holds
out ~10% of its documents, disjoint from the training ones."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import converters
import ssm_llm
from converters.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments"))
import text_corpus as tc  # noqa: E402
import train_mamba2 as tm  # noqa: E402

STEPS = 16
TINY_ARGS = [
    "--preset",
    "tiny",
    "--steps",
    str(STEPS),
    "--batch",
    "4",
    "--seq-len",
    "32",
    "--lr",
    "1e-2",
    "--warmup",
    "2",
    "--corpus",
    "pydoc",
    "--max-chars",
    "100000",
    "--eval-windows",
    "4",
    "--sample-tokens",
    "8",
    "--ckpt-every",
    "100",
]


def run(tmp: Path, name: str, *extra: str) -> dict:
    out = tmp / name
    tm.main(TINY_ARGS + ["--out", str(out), "--results", str(tmp / f"{name}.json"), *extra])
    return json.loads((tmp / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return converters.load_tokenizer(ssm_llm.default_model_path())


@pytest.fixture(scope="module")
def mamba2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mamba2")
    return tmp, run(tmp, "straight", "--family", "mamba2")


def training_params(out: Path, config) -> dict:
    """The params of the last checkpoint in `out` (the training state, not the export)."""
    h = tm.Hparams(steps=STEPS, peak_lr=1e-2, warmup=2, weight_decay=0.1, clip=1.0)
    manager = tm.checkpoint_manager(out / "checkpoints")
    state, _ = tm.restore_checkpoint(manager, tm.init_state(config, h, 0))
    manager.close()
    return state["params"]


def check_export(out: Path, family: str, compare_logits: bool = True) -> None:
    """The export reloads and equals the last checkpoint's params; with `compare_logits`, `ssm_llm.forward` on
    it also gives the training model's logits."""
    config, params = load_checkpoint(out / "model")
    expected_type = ssm_llm.Mamba2Config if family == "mamba2" else ssm_llm.MambaConfig
    assert isinstance(config, expected_type) and config.tie_word_embeddings and config.num_layers == 2
    assert config.hidden_size == 64 and config.intermediate_size == 128
    trained = training_params(out, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, trained)
    if not compare_logits:
        return
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    logits, _ = ssm_llm.forward(params, config, tokens, ssm_llm.init_cache(config, 2, 40))
    expected = jax.jit(tm.model_logits, static_argnums=1)(trained, config, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_mamba2_loss_falls_and_export_matches(mamba2_run):
    tmp, result = mamba2_run
    losses = result["training"]["losses"]
    assert len(losses) == STEPS and result["training"]["completed"]
    assert np.mean(losses[:4]) > np.log(49152) - 0.1  # starts near uniform over the vocabulary
    assert np.mean(losses[-6:]) < np.mean(losses[:4]) - 2.0
    assert result["eval"]["perplexity"] < 49152 / 10 and result["eval"]["windows"] == 4
    assert result["model"]["parameters"] == 49152 * 64 + result["model"]["parameters_without_embedding"]
    assert (tmp / "straight.png").stat().st_size > 0
    check_export(tmp / "straight", "mamba2")


def test_stop_and_resume_equals_straight_run(mamba2_run):
    tmp, straight = mamba2_run
    first = run(tmp, "resumed", "--family", "mamba2", "--stop-at", "7", "--ckpt-every", "5")
    assert first["training"]["steps_done"] == 7 and not first["training"]["completed"]
    second = run(tmp, "resumed", "--family", "mamba2")
    assert second["training"]["this_run"]["start_step"] == 7 and second["training"]["completed"]
    assert second["training"]["losses"] == straight["training"]["losses"]
    _, a = load_checkpoint(tmp / "straight" / "model")
    _, b = load_checkpoint(tmp / "resumed" / "model")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)

    with pytest.raises(ValueError, match="different run.*lr"):  # other settings do not resume silently
        run(tmp, "resumed", "--family", "mamba2", "--lr", "5e-3")


def test_mamba1_trains_and_exports(tmp_path):
    result = run(tmp_path, "m1", "--family", "mamba1", "--steps", "12", "--sample-tokens", "0")
    losses = result["training"]["losses"]
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3 and result["sample"] is None
    check_export(tmp_path / "m1", "mamba1", compare_logits=False)  # the logits check (two compiles) runs on Mamba-2


def test_split_is_by_document_disjoint_and_about_a_tenth(tokenizer, tmp_path):
    corpus = tc.load_corpus(("pydoc",), tokenizer=tokenizer, cache_dir=tmp_path, progress=False)
    docs = corpus.documents
    train, held = corpus.split_indices("train"), corpus.split_indices("eval")
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(docs)
    assert abs(len(held) / len(docs) - 0.1) < 0.02
    held_texts = {docs[i].text for i in held}
    assert not held_texts & {docs[i].text for i in train}
    train_tokens, eval_tokens = corpus.split_tokens("train"), corpus.split_tokens("eval")
    assert 0.05 < len(eval_tokens) / (len(train_tokens) + len(eval_tokens)) < 0.15
    # Each stream is exactly its documents' tokens plus separators where the text breaks.
    for split, stream in (("train", train_tokens), ("eval", eval_tokens)):
        body = np.concatenate(
            [corpus.tokens[corpus.offsets[i] : corpus.offsets[i + 1]] for i in corpus.split_indices(split)]
        )
        assert len(stream) > len(body)
        sep = corpus.separator
        assert (stream == sep).sum() - (body == sep).sum() == len(stream) - len(body)
        np.testing.assert_array_equal(stream[stream != sep], body[body != sep])
    # Cutting keeps every source text whole, and a small corpus holds the full one's first documents.
    texts = dict(tc.source_texts(("pydoc",)))
    for name in ("pydoc:assert", "pydoc:function"):
        assert "".join(d.text for d in docs if d.source == name) == texts[name]
    small = tc.corpus_documents(("pydoc",), max_chars=30_000)
    assert small == docs[: len(small)] and sum(len(d.text) for d in small[:-1]) < 30_000
    # The second load comes from the .npy cache.
    assert len(list(tmp_path.glob("*.npy"))) == 2
    again = tc.load_corpus(("pydoc",), tokenizer=tokenizer, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.split_tokens("eval"), eval_tokens)


@pytest.mark.slow
def test_full_corpus_holds_out_a_tenth(tokenizer):
    """The whole corpus (~3.2M tokens; tokenizing takes ~10 s unless cached) holds out ~10% of its
    documents and of its tokens."""
    corpus = tc.load_corpus(tokenizer=tokenizer, progress=False)
    assert abs(corpus.held_out.mean() - 0.1) < 0.005
    held = len(corpus.split_tokens("eval")) / len(corpus.split_tokens("all"))
    assert 0.09 < held < 0.11


def test_missing_vim_manuals_raise_with_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*pydoc"):
        tc.corpus_documents(("pydoc", "vim"), vim_dir=tmp_path)


def test_windows():
    tokens = np.arange(1000, dtype=np.int32)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    a, b = tc.batches(tokens, 4, 16, rng_a), tc.batches(tokens, 4, 16, rng_b)
    first = next(a)
    assert first.shape == (4, 17) and np.all(np.diff(first, axis=1) == 1)
    np.testing.assert_array_equal(first, next(b))
    state = rng_a.bit_generator.state  # a generator restored to this state continues identically
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = state
    np.testing.assert_array_equal(next(a), next(tc.batches(tokens, 4, 16, resumed)))

    every = tc.eval_windows(tokens, 10)
    assert every.shape == (99, 11) and np.array_equal(every[:, 1:].ravel(), np.arange(1, 991))
    some = tc.eval_windows(tokens, 10, max_windows=5)
    assert some.shape == (5, 11) and some[0, 0] == 0 and some[-1, 0] == 980
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 11 tokens"):
        tc.eval_windows(tokens[:10], 10)
