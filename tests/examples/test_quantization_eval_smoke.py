"""Smoke test of experiments/quantization_eval.py on the real SmolLM2 at tiny sizes (the first ~100 KB of
the corpus): the JSON's rows and keys, fp32 scoring against itself, a quantized row's bytes. (The kept GGUF
codes are the float model: tests/models/test_smollm2.py::test_packed_q4_1_load_is_the_float_model.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments"))
import quantization_eval as qe  # noqa: E402

# The real model (~45 s): outside the default run to keep CI under 25 min; `-m slow` runs it.
pytestmark = [pytest.mark.optimized_xla, pytest.mark.slow]


def test_tiny_run_writes_the_json(tmp_path):
    out = tmp_path / "eval.json"
    args = ["--quick", "--max-chars", "100000", "--eval-windows", "2", "--seq-len", "32", "--calib-seqs", "1"]
    args += ["--calib-len", "32", "--prompts", "2", "--prompt-len", "8", "--new-tokens", "4", "--eval-batch", "2"]
    result = qe.main([*args, "--rows", "w8a8 rot", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert list(saved["rows"]) == ["fp32", "w8a8 rot"]
    assert saved["setup"]["evaluation"]["scored_tokens"] == 64 and {"cpu", "int8_dot"} <= set(saved["machine"])
    fp32 = result["rows"]["fp32"]
    assert fp32["kl_to_fp32"] == 0 and fp32["next_token_agreement"] == 1 and fp32["greedy_same_tokens"] == 1
    assert fp32["divergence_margins"] == [] and set(saved["setup"]["fp32_margin_quantiles"]) == {"10%", "50%", "90%"}
    row = result["rows"]["w8a8 rot"]
    assert len(row["divergence_margins"]) == len(row["divergence_ranks"]) <= 2
    assert all(r >= 0 for r in row["divergence_ranks"]) and 0 < saved["setup"]["fp32_forward_retraces_greedy"] <= 1
    assert 0 < row["linear_bytes_ratio"] < 0.3
    assert out.with_suffix(".png").is_file()
