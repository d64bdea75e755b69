"""Decode speed of SmolLM2 `w8a8-rot-emb` with the int8 head's input rounded in one or two int8 terms
(`ssm_llm.models.lm_head.HEAD_TERMS`), each setting in its own child process (the constant is read when a program is
traced), alternating, batch 1 and 16, 64 new tokens after 128 prompt tokens.

    python experiments/bench_head_terms.py --runs 3   # -> results/bench_head_terms.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(terms: int) -> dict:
    """One setting: decode tok/s at batch 1 and 16, (N - 1) * batch / (t(N tokens) - t(1 token)), best of 3."""
    import converters
    import ssm_llm
    from ssm_llm.models import lm_head

    lm_head.HEAD_TERMS = terms
    config, params = converters.load(ssm_llm.default_model_path(), quantize="w8a8-rot-emb")
    out = {}
    for batch in (1, 16):
        prompts = [[100 + i + t for t in range(128)] for i in range(batch)]

        def seconds(n, prompts=prompts):
            gen = ssm_llm.GenerationConfig(max_new_tokens=n, eos_token_ids=())
            start = time.perf_counter()
            ssm_llm.generate(params, config, prompts, gen)
            return time.perf_counter() - start

        seconds(1), seconds(64)  # compile
        one, many = min(seconds(1) for _ in range(3)), min(seconds(64) for _ in range(3))
        out[f"batch {batch}"] = 63 * batch / (many - one)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="alternating child processes per setting")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_head_terms.json")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    from bench_runners import machine_info

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = {1: [], 2: []}
    for _ in range(args.runs):
        for terms in (2, 1):
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(terms)], capture_output=True, text=True, env=env, check=True
            )
            runs[terms].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"terms={terms}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in runs[terms][-1].items()), flush=True)
    summary = {
        f"{terms} term{'s' * (terms > 1)}": {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for terms, rs in runs.items()
    }
    for key in summary["2 terms"]:
        summary[f"2 terms / 1 term, {key}"] = summary["2 terms"][key] / summary["1 term"][key]
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(exist_ok=True)
    result = {"machine": machine_info(), "runs": {str(k): v for k, v in runs.items()}, "median": summary}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
