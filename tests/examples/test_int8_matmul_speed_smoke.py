"""Smoke test of experiments/int8_matmul_speed.py: a one-layer run writes the JSON with the CPU's flags, and
its integer product is the float product of the rounded operands (numpy, exact in float64)."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments"))
import int8_matmul_speed as bench  # noqa: E402


def test_one_layer_run_writes_the_json(tmp_path):
    out = tmp_path / "speed.json"
    result = bench.main(["--layers", "1", "--rows", "1", "2", "--repeats", "1", "--skip-lm-head", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["products_per_call"] == 7 and set(saved["layers_ms"]) == set(bench.VARIANTS)
    assert {"cpu", "cpu_flags", "int8_dot", "bf16", "cores"} <= set(saved["machine"])
    assert all(ms > 0 for per in result["layers_ms"].values() for ms in per.values())


def test_w8a8_product_is_the_product_of_the_rounded_operands():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((64, 5)).astype(np.float32)
    codes, scale = (np.asarray(a) for a in bench.quantize_weight(w))
    x_scale = np.abs(x).max(-1, keepdims=True) / 127.0
    xq = np.clip(np.round(x / x_scale), -127, 127)
    expected = (xq.astype(np.int64) @ codes.astype(np.int64)) * x_scale.astype(np.float64) * scale
    got = np.asarray(bench.w8a8_product(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(scale)))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
