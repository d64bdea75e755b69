"""Smoke test of experiments/minference_eval.py on SmolLM2 at a 640-token length (10 blocks of 64, so the sparse
prefill really runs): a task, the perplexity and the timing are written; and the RULER-style prompts hold what
their scorers look for."""

import json
import sys
from pathlib import Path

import numpy as np

import converters
import ssm_llm

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments"))
import long_context_tasks as tasks  # noqa: E402
import minference_eval as ev  # noqa: E402
from kv_compression_eval import text_ids  # noqa: E402


def test_script_runs_and_measures(tmp_path):
    out = tmp_path / "eval.json"
    ev.main(
        ["--lengths", "640", "--tasks", "multikey", "--samples", "1", "--ppl-length", "640", "--ppl-last", "32"]
        + ["--speed-lengths", "640", "--repeats", "1", "--configs", "vertical_slash", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert list(result["configs"]) == ["full", "vertical_slash"]
    assert set(result["tasks"]) == {"multikey"}
    for rows in result["tasks"].values():
        for name in ("full", "vertical_slash"):
            row = rows["640"]["configs"][name]
            assert len(row["answers"]) == 1 and 0 <= row["score"] <= 1
    ppl = result["perplexity"]["configs"]
    assert np.isfinite(ppl["full"]["perplexity"]) and ppl["vertical_slash"]["kl"] >= 0
    assert result["speed"]["640"]["full"]["speedup_vs_full"] == 1.0


def test_ruler_prompts_are_exact_and_scored():
    tokenizer = converters.load_tokenizer(ssm_llm.default_model_path())
    hay = text_ids(tokenizer, 700, start=0.0)
    rng = np.random.default_rng(0)
    prompt, number = tasks.multikey_prompt(tokenizer, hay, 600, rng, needles=3)
    text = tokenizer.decode(prompt)
    assert len(prompt) == 600 and text.count("special magic number") == 5  # 3 needles, 2 in the question
    assert f"is: {number}." in text
    assert tasks.multikey_score(f" {number}.", number) == 1.0 and tasks.multikey_score(" 12.", number) == 0.0
    prompt, (chain, other) = tasks.variables_prompt(tokenizer, hay, 600, rng, hops=3)
    text = tokenizer.decode(prompt)
    assert len(prompt) == 600 and all(f"VAR {name} =" in text for name in chain + other)
    assert tasks.variables_score(" " + ", ".join(chain), (chain, other)) == 1.0
    assert tasks.variables_score(f" {chain[0]}, {chain[1]}", (chain, other)) == 0.5
    assert tasks.variables_score(f" {chain[0]}, {other[0]}", (chain, other)) == 0.0
