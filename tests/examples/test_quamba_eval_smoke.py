"""Smoke test of experiments/quamba_eval.py: the whole script on random-weight tiny Mamba-2 and Mamba-1
(a few rows, tiny sizes, the first ~100 KB of Python's reference), its JSON keys and measured bytes, its
fp32 perplexity against one plain forward, and the row grid and the missing-model error."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import converters
import ssm_llm

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments"))
import quamba_eval as qe  # noqa: E402
import text_corpus  # noqa: E402

SIZES = [
    "--corpus",
    "pydoc",
    "--max-chars",
    "100000",
    "--calib-seqs",
    "2",
    "--calib-len",
    "32",
    "--eval-windows",
    "3",
    "--seq-len",
    "32",
    "--eval-batch",
    "2",
    "--decode-steps",
    "3",
    "--decode-repeats",
    "1",
    "--prompt-len",
    "8",
]
# One quantized row per family keeps this fast: the full Mamba-2 recipe with 8-bit activations, and
# a Mamba-1 round-to-nearest row ("mamba1:": the naive rows of both families share names).
ROWS = ["quamba2 W8A8", "mamba1:naive W4A16"]
ROW_KEYS = {
    "kind",
    "bits",
    "ingredient",
    "scheme",
    "mean_nll",
    "perplexity",
    "ppl_ratio",
    "weight_bytes",
    "linears_bytes_ratio",
    "cache_bytes_batch1",
    "cache_bytes_ratio",
    "quantize_s",
    "eval_s_incl_compile",
    "decode",
    "greedy_tokens",
    "greedy_prefix_match_fp32",
}


@pytest.mark.slow  # the whole script end to end, 36 s (CI time); its parts are tested in tests/quant/test_quant_*.py
def test_script_runs_and_measures(tmp_path):
    out = tmp_path / "quamba.json"
    qe.main(["--tiny-random", "--families", "mamba2", "mamba1", "--rows", *ROWS, *SIZES, "--out", str(out)])
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["tiny_random"] and result["machine"]["jax_backend"] == "cpu"
    assert result["setup"]["calibration"]["split"] == "train" and result["setup"]["evaluation"]["windows"] == 3
    families = result["families"]
    assert list(families) == ["mamba2", "mamba1"]
    assert list(families["mamba2"]["rows"]) == ["fp32", "quamba2 W8A8"]
    assert list(families["mamba1"]["rows"]) == ["fp32", "naive W4A16"]
    assert families["mamba1"]["aliases"] == {"naive W4A16 +percentile": "naive W4A16"}
    for family in families.values():
        assert set(family) == {"model", "rows", "aliases", "targets", "ingredients", "notes"}
        rows = family["rows"]
        fp32 = rows["fp32"]
        assert fp32["ppl_ratio"] == 1.0 and fp32["quantize_s"] == 0.0 and fp32["scheme"] is None
        for name, row in rows.items():
            assert set(row) == ROW_KEYS, name
            assert math.isfinite(row["perplexity"]) and row["decode"]["tok_s"] > 0
            assert len(row["greedy_tokens"]) == 3 and set(row["decode"]) >= {"tok_s", "ratio_to_fp32"}
            w = row["weight_bytes"]
            assert w["total"] == w["linears"] + w["embed_and_lm_head"] + w["other"]
            if row["bits"] is None:
                continue
            # int8 values (+ per-channel scales) are ~1/4 of float32; packed int4 (+ group scales) ~1/8
            weight_bits = row["scheme"]["weight_bits"]
            assert row["linears_bytes_ratio"] < {8: 0.3, 4: 0.2}[weight_bits], name
            assert w["embed_and_lm_head"] == 2 * fp32["weight_bytes"]["embed_and_lm_head"]  # lm_head untied
            a8 = row["scheme"]["act_bits"] == 8
            assert (row["cache_bytes_ratio"] < 0.3) if a8 else (row["cache_bytes_ratio"] == 1.0), name
    m2 = families["mamba2"]
    assert m2["targets"]["W8A8 within 1%"]["row"] == "quamba2 W8A8"
    assert m2["targets"]["W8A8 within 1%"]["holds"] in (True, False)
    assert m2["targets"]["W4A8 within 3%"]["holds"] is None  # not run
    assert set(m2["ingredients"]) == {"hadamard", "cluster", "bc_groups", "gptq"}
    assert m2["notes"][0].startswith("bc_groups: the model has a single B/C state group")  # the tiny preset's
    assert m2["ingredients"]["cluster"]["W4A16"].startswith("not applicable")
    w8 = m2["ingredients"]["gptq"]["W8A8"]
    assert w8["full"] == m2["rows"]["quamba2 W8A8"]["perplexity"] and w8["adding_lowers_ppl"] is None
    m1 = families["mamba1"]
    assert set(m1["ingredients"]) == {"hadamard", "percentile", "gptq"}
    assert [t["holds"] for t in m1["targets"].values()] == [None, None]

    # The fp32 perplexity is the mean next-token NLL of the held-out windows under one plain forward.
    tokenizer = converters.load_tokenizer(ssm_llm.default_model_path())
    corpus = text_corpus.load_corpus(("pydoc",), max_chars=100000, tokenizer=tokenizer, progress=False)
    windows = text_corpus.eval_windows(corpus.split_tokens("eval"), 32, 3)
    config, params, _ = qe.load_family("mamba2", None, tokenizer, corpus.separator)
    logits, _ = ssm_llm.forward(params, config, windows[:, :-1], ssm_llm.init_cache(config, 3, 32))
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(m2["rows"]["fp32"]["mean_nll"], nll, rtol=1e-5)


def test_row_grid_and_aliases():
    rows, aliases = qe.family_rows("mamba2")
    names = [r.name for r in rows]
    assert names[:3] == ["fp32", "naive W8A8", "quamba2 W8A8"]
    assert {"naive W4A8", "quamba2 W4A8", "naive W4A16", "quamba2 W4A16"} <= set(names)
    for bits in ("W8A8", "W4A8"):  # the full ablation: 4 ingredients added to naive, 4 removed from full
        assert sum(r.bits == bits and r.kind in ("naive+", "full-") for r in rows) == 8
    # W4A16 keeps activations in float: only hadamard and gptq change it, and full minus one is naive plus the other
    assert [r.name for r in rows if r.bits == "W4A16" and r.kind == "naive+"] == [
        "naive W4A16 +hadamard",
        "naive W4A16 +gptq",
    ]
    assert aliases["quamba2 W4A16 -gptq"] == "naive W4A16 +hadamard"
    assert aliases["naive W4A16 +cluster"] == "naive W4A16"
    assert len(rows) == 25 and len(set(names)) == len(names)
    m1, m1_aliases = qe.family_rows("mamba1")
    assert len(m1) == 21 and "quamba W4A8 -percentile" in [r.name for r in m1]
    assert m1_aliases["naive W4A16 +percentile"] == "naive W4A16"
    selected = qe.select_rows("mamba2", rows, aliases, ["quamba2 w4a8*"])
    assert [r.name for r in selected] == ["fp32", "quamba2 W4A8"] + [
        f"quamba2 W4A8 -{i}" for i in qe.INGREDIENTS["mamba2"]
    ]
    assert [r.name for r in qe.select_rows("mamba2", rows, aliases, ["quamba2 W4A16 -gptq"])] == [
        "fp32",
        "naive W4A16 +hadamard",
    ]  # an alias selects the row it stands for
    assert [r.name for r in qe.select_rows("mamba1", m1, m1_aliases, ["mamba2:naive*"])] == ["fp32"]
    assert len(qe.select_rows("mamba1", m1, m1_aliases, ["mamba1:naive*"])) == 1 + 3 + 3 + 3 + 2


def test_missing_model_prints_the_train_command(tmp_path, capsys):
    with pytest.raises(SystemExit):
        qe.main(["--families", "mamba1", "--model-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"no trained mamba1 model at {tmp_path / 'mamba1-small' / 'model'}" in err
    assert f"python experiments/train_mamba2.py --family mamba1 --preset small --out {tmp_path / 'mamba1-small'}" in err
    with pytest.raises(SystemExit):
        qe.main(["--quick", "--families", "mamba2", "--model-dir", f"mamba2={tmp_path / 'm2' / 'model'}"])
    assert f"--family mamba2 --preset tiny --out {tmp_path / 'm2'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qe.main(["--tiny-random", "--rows", "no such row"])
    assert "match no row" in capsys.readouterr().err
