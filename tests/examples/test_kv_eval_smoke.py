"""Smoke test of experiments/kv_compression_eval.py: the whole script on a tiny random model (SmolLM2's
tokenizer, short prompts, StreamingLLM only), its measured byte ratios, and its teacher-forced
perplexity against one plain dense forward recomputed in numpy."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

import converters
import ssm_llm

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments"))
import kv_compression_eval as ev  # noqa: E402

ARGS = [
    "--tiny-model",
    "--methods",
    "streamingllm",
    "--lengths",
    "160",
    "--depths",
    "0.3",
    "0.8",
    "--answer-tokens",
    "4",
    "--ppl-prefix",
    "64",
    "--ppl-tokens",
    "8",
    "--ppl-docs",
    "2",
    "--speed-length",
    "160",
    "--speed-steps",
    "3",
    "--repeats",
    "1",
    "--tasks",
    "multikey",
    "variables",
    "--task-lengths",
    "256",
    "--samples",
    "2",
]


def test_script_runs_and_measures(tmp_path):
    out = tmp_path / "eval.json"
    ev.main(ARGS + ["--out", str(out)])
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    names = ["full", "streamingllm 1/2", "streamingllm 1/4", "streamingllm 1/8"]
    assert [c["name"] for c in result["configs"]] == names
    assert result["machine"]["jax_backend"] == "cpu"

    # (c) bytes: the ring buffer holds budget = prompt // r slots (+ a position each) against the
    # prompt + decode room of the full cache: 160 tokens + 4 slots (max(answer - 1, speed steps) + 1).
    row = result["passkey"]["160"]["configs"]
    assert row["full"]["ratio"] == 1.0 and row["full"]["capacity"] == 164
    for r, name in zip((2, 4, 8), names[1:], strict=True):
        slots = 160 // r
        assert row[name]["capacity"] == slots
        per_slot = 2 * 16 * 4 + 4  # k + v float32 over head_dim 16, plus an int32 position
        assert row[name]["cache_bytes"] == 2 * 2 * 2 * slots * per_slot + 2 * 2 * 4  # L, B, H_kv; lengths + used
        np.testing.assert_allclose(row[name]["ratio"], 1 / r * 160 / 164, rtol=0.05)
        assert len(row[name]["answers"]) == 2 and len(row[name]["correct"]) == 2

    summary = result["summary"]
    for name in names:
        assert 0 <= summary[name]["passkey_accuracy"] <= 1
        assert np.isfinite(summary[name]["perplexity"])
        timing = result["decode_speed"]["configs"][name]  # tiny-model timings are noise: only their presence
        assert len(timing["t_1"]) == len(timing["t_n"]) == 1 and "decode_tok_s" in summary[name]
    assert all(summary[name]["kl"] >= 0 for name in names[1:])

    # (e) each task: 2 prompts of 256 tokens, every config's answers and scores.
    for task in ("multikey", "variables"):
        row = result["tasks"][task]["256"]
        assert len(row["expected"]) == 2
        for name in names:
            got = row["configs"][name]
            assert len(got["answers"]) == len(got["scores"]) == 2 and 0 <= got["score"] <= 2
            assert summary[name]["tasks"][task] == {"256": got["score"]}

    # (b) the full cache's teacher-forced perplexity = one dense forward over the same 2 documents: 64
    # prefix tokens, then tokens 64..71 fed one by one, each predicting the next (65..72).
    tokenizer = converters.load_tokenizer(ssm_llm.default_model_path())
    config, params = ev.tiny_model(len(tokenizer))
    ids = np.asarray(ev.text_ids(tokenizer, 2 * 73, start=0.5)[: 2 * 73]).reshape(2, 73)
    logits, _ = ssm_llm.forward(params, config, ids[:, :72], ssm_llm.init_cache(config, 2, 72))
    logits = np.asarray(logits[:, 64:72], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 65:73, None], axis=-1).mean()
    np.testing.assert_allclose(np.log(summary["full"]["perplexity"]), nll, rtol=1e-5)


def test_continuation_metrics_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 2, 7))
    ref_logits = logits + 0.3 * rng.normal(size=logits.shape)
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    ref = np.asarray(jax.nn.log_softmax(ref_logits, -1), np.float64)
    targets = rng.integers(0, 7, size=(2, 5))
    got = ev.continuation_metrics(logp, targets, ref)
    p, q = np.exp(ref), np.exp(logp)
    want_kl = np.mean([np.sum(p[n, b] * np.log(p[n, b] / q[n, b])) for n in range(5) for b in range(2)])
    want_nll = -np.mean([np.log(q[n, b, targets[b, n]]) for n in range(5) for b in range(2)])
    np.testing.assert_allclose(got["kl"], want_kl, rtol=1e-6)
    np.testing.assert_allclose(got["perplexity"], np.exp(want_nll), rtol=1e-6)
    assert got["top1_agreement"] == np.mean(ref.argmax(-1) == logp.argmax(-1))


def test_unknown_or_missing_methods_fail_clearly():
    import pytest

    with pytest.raises(ValueError, match="unknown method"):
        ev.select_configs(["nosuchkv"])
    missing = ev.Config("imaginary", "1/2", lambda n: ev.kv_class("imaginary", "ImaginaryKV")(budget=n))
    with pytest.raises(RuntimeError, match="'imaginary' needs ssm_llm.kv.ImaginaryKV"):
        missing.policy(64)
    with pytest.raises(RuntimeError, match="streamingllm"):
        ev.GRID["streamingllm"][2].policy(32)  # budget 32 // 8 = 4 slots: no room beside the 4 sinks


def test_passkey_prompt_is_exact_and_holds_the_key():
    tokenizer = converters.load_tokenizer(ssm_llm.default_model_path())
    hay = ev.text_ids(tokenizer, 400, start=0.0)
    hay_text = tokenizer.batch_decode([[t] for t in hay])
    for depth in (0.0, 0.5, 1.0):
        ids = ev.passkey_prompt(tokenizer, hay, hay_text, 300, depth, 71432)
        text = tokenizer.decode(ids)
        assert len(ids) == 300 and text.count("71432") == 2
        assert text.startswith(ev.INTRO) and text.endswith(ev.QUESTION)
