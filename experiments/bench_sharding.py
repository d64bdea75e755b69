"""Sharded models on whatever devices exist: for each mesh, the bytes each device holds (weights and a
decode cache, measured on the placed arrays and planned by `ssm_llm.sharding.plan`) and the time of one
decode step and of a prefill. On one CPU the devices are simulated (8 by default:
`--xla_force_host_platform_device_count`), which share the same cores, so the times there say nothing
about speed-ups; what this checks on a CPU is that the bytes per device fall as 1/tp. On a GPU or TPU
machine the same script times real speed-ups.

    python experiments/bench_sharding.py                      # -> results/bench_sharding.json
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_runners import machine_info  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import ssm_llm  # noqa: E402
from ssm_llm.sharding import plan, shard_batch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {  # SmolLM2-135M's shape (9 / 3 heads: tp 1 or 3) and a Llama / Mamba-2 whose heads split 8 ways
    "smollm2-135m-shaped": ssm_llm.ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-8-heads": ssm_llm.ModelConfig(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
    ),
    "mamba2-8-heads": ssm_llm.Mamba2Config(
        vocab_size=32768,
        hidden_size=512,
        num_layers=8,
        state_size=64,
        intermediate_size=1024,
        num_heads=16,
        head_dim=64,
        n_groups=1,
        chunk_size=64,
    ),
}
MESHES = {"smollm2-135m-shaped": [(1, 1), (1, 3), (2, 3)], "llama-8-heads": [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4)]}
MESHES["mamba2-8-heads"] = MESHES["llama-8-heads"]


def held(tree) -> int:
    """Bytes on the first device (every device holds the same amount under even splits)."""
    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(name, config, shape, batch, prompt, max_len, repeats) -> dict:
    mesh = Mesh(np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape), ("data", "model"))
    params = ssm_llm.shard_params(ssm_llm.init_params(config, jax.random.key(0)), config, mesh)
    cache = ssm_llm.init_cache(config, batch, max_len, mesh=mesh)
    step = jax.jit(lambda p, t, c: ssm_llm.forward(p, config, t, c))
    tokens = shard_batch(np.ones((batch, prompt), np.int32), mesh)
    _, filled = step(params, tokens, cache)
    one = shard_batch(np.ones((batch, 1), np.int32), mesh)
    planned = plan(config, mesh, batch, max_len)
    return {
        "model": name,
        "mesh": list(shape),
        "weights_per_device": held(params),
        "cache_per_device": held(cache),
        "planned": dataclasses.asdict(planned),
        "prefill_s": median_seconds(lambda: step(params, tokens, cache)[0], repeats),
        "decode_step_s": median_seconds(lambda: step(params, one, filled)[0], repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_sharding.json")
    args = parser.parse_args()
    rows = []
    for name, config in MODELS.items():
        for shape in MESHES[name]:
            if shape[0] * shape[1] > jax.device_count():
                continue
            row = run(name, config, shape, args.batch, args.prompt, args.max_len, args.repeats)
            base = next((r for r in rows if r["model"] == name and r["mesh"] == [1, 1]), row)
            row["weights_vs_one_device"] = row["weights_per_device"] / base["weights_per_device"]
            rows.append(row)
            print(
                f"{name:22} {shape[0]}x{shape[1]}  weights/device {row['weights_per_device'] / 2**20:8.1f} MiB "
                f"({row['weights_vs_one_device']:.3f}x)  cache {row['cache_per_device'] / 2**20:6.1f} MiB  "
                f"prefill {row['prefill_s'] * 1e3:7.1f} ms  decode step {row['decode_step_s'] * 1e3:6.2f} ms",
                flush=True,
            )
    report = {
        "machine": machine_info(),
        "devices": [str(d) for d in jax.devices()],
        "simulated": jax.default_backend() == "cpu",
        "batch": args.batch,
        "prompt": args.prompt,
        "max_len": args.max_len,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
