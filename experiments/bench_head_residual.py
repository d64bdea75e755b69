"""Decode speed of SmolLM2 W8A8 (rotated, int8 head) with and without the head residual (`quantize_weights(...,
head_residual=True)`, the `w8a8-rot-emb` preset: each row's top logits refined, embedding rows read at 12 bits),
in one process, the two models alternating at each batch size (1 and 16), 64 new tokens after 128 prompt tokens.

    python experiments/bench_head_residual.py --runs 3   # -> results/bench_head_residual.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 16)


def decode_rate(params, config, batch: int) -> float:
    """Decode tok/s, (N - 1) * batch / (t(N tokens) - t(1 token)), best of 3 (compiled first)."""
    import ssm_llm

    prompts = [[100 + i + t for t in range(128)] for i in range(batch)]

    def seconds(n):
        gen = ssm_llm.GenerationConfig(max_new_tokens=n, eos_token_ids=())
        start = time.perf_counter()
        ssm_llm.generate(params, config, prompts, gen)
        return time.perf_counter() - start

    seconds(1), seconds(64)
    one, many = min(seconds(1) for _ in range(3)), min(seconds(64) for _ in range(3))
    return 63 * batch / (many - one)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_head_residual.json")
    args = parser.parse_args()
    from bench_runners import machine_info, tree_bytes

    import converters
    import ssm_llm
    from ssm_llm.int8_blocks import for_cpu_kernel

    config, params = converters.load(ssm_llm.default_model_path())
    models = {}
    for name, residual in (("int8 head", False), ("int8 head + residual", True)):
        q, qc = ssm_llm.quantize_weights(params, config, "w8a8", rotation=True, embedding=True, head_residual=residual)
        models[name] = (for_cpu_kernel(q, qc), qc, tree_bytes(q))
    runs = {name: [] for name in models}
    for _ in range(args.runs):
        for name in models:
            runs[name].append({})
        for b in BATCHES:  # the two models alternate at each batch size
            for name, (p, c, _) in models.items():
                runs[name][-1][f"batch {b}"] = decode_rate(p, c, b)
        for name in models:
            print(f"{name}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in runs[name][-1].items()), flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for b in BATCHES:
        key = f"batch {b}"
        summary[f"residual / int8 head, {key}"] = summary["int8 head + residual"][key] / summary["int8 head"][key]
    summary["bytes"] = {name: m[2] for name, m in models.items()}
    summary["bytes ratio to float32"] = {name: m[2] / tree_bytes(params) for name, m in models.items()}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(exist_ok=True)
    result = {"machine": machine_info(), "runs": runs, "median": summary}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
