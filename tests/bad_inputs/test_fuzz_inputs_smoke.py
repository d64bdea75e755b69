"""Smoke test of experiments/fuzz_inputs.py: a short run over the targets that need no PyTorch (text specs,
generate, jitted forward, GGUF and orbax loaders) writes a complete JSON result with no unsafe, hung,
crashed or silent example. The full 20-minute run is the script's own (README quotes it)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "experiments" / "fuzz_inputs.py"
TARGETS = ["spec_policy", "spec_drafter", "generate_options", "forward_jit", "load_gguf", "load_orbax"]


def test_short_fuzz_run_is_clean(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--budget-seconds",
            "15",
            "--max-examples-per-target",
            "3",
            "--timeout",
            "30",
            "--targets",
            ",".join(TARGETS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    for key in ("machine", "budget_seconds", "wall_seconds", "counts", "totals", "findings", "examples", "targets"):
        assert key in result
    assert result["machine"]["cpu"] and "cpu_flags" in result["machine"] and result["machine"]["jax"]
    assert result["targets"] == TARGETS and set(result["counts"]) == set(TARGETS)
    outcomes = ["ok", "clear", "unclear", "crash", "silent", "hang", "unsafe"]
    assert result["outcomes"] == outcomes
    for counts in result["counts"].values():
        assert set(counts) == set(outcomes) and all(n <= 3 for n in counts.values())
    assert sum(result["totals"].values()) == result["examples"] >= 3
    bad = {o: result["totals"][o] for o in ("crash", "silent", "hang", "unsafe")}
    assert not any(bad.values()), (bad, result["findings"])
    assert "total" in proc.stdout.splitlines()[-1]  # the table is printed last
