"""StreamingLLM requests in the serving engine against full pages, SmolLM2-135M, side by side in one run:
the pages a batch of long generations holds at its peak (so how many such requests a pool holds), decode
throughput, how far the greedy outputs follow full attention's, and, for two of the requests, equality with
`generate` given the same policy alone.

Real chat prompts (a paragraph of Python's language reference to sum up), `--new-tokens` greedy tokens each
with no EOS stop, all submitted at once; StreamingLLM(budget, sinks=4, positions="original").

python experiments/bench_engine_streaming.py [--requests 8] [--new-tokens 384] [--budget 64]
Writes experiments/results/bench_engine_streaming.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from bench_runners import machine_info
from bench_serving import real_prompts

import converters
import ssm_llm
from ssm_llm.serving import Engine

RESULTS = Path(__file__).parent / "results"


def run(engine: Engine, prompts, gen_config) -> tuple[list[list[int]], float, int]:
    """(outputs, wall seconds, most pages in use at once) of the prompts submitted together."""
    rids = [engine.submit(p, gen_config) for p in prompts]
    done, peak = {}, 0
    start = time.perf_counter()
    while engine.has_work():
        for event in engine.step():
            done.setdefault(event.rid, []).extend(event.new_token_ids)
        peak = max(peak, engine.stats()["pages_used"])
    return [done[rid] for rid in rids], time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=384)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    args = parser.parse_args()
    path = ssm_llm.default_model_path()
    config, params = converters.load(path, cache=True)
    prompts = real_prompts(converters.load_text_tokenizer(path), args.requests, np.random.default_rng(0))
    policy = ssm_llm.kv.StreamingLLM(budget=args.budget, sinks=args.sinks, positions="original")
    full = ssm_llm.GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=())
    configs = {"full pages": full, "streaming": dataclasses.replace(full, kv_compression=policy)}
    options = dict(max_slots=args.requests, page_size=16, max_len=1024, chunk=64, prefix_caching=False)
    result = {
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (float32)",
        "requests": args.requests,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "policy": {"budget": args.budget, "sinks": args.sinks, "positions": "original"},
        "engine": {**options},
        "runs": {},
    }
    outputs = {}
    for name, gen_config in configs.items():
        run(Engine(params, config, **options), prompts[:2], dataclasses.replace(gen_config, max_new_tokens=8))
        outputs[name], wall, peak = run(Engine(params, config, **options), prompts, gen_config)
        result["runs"][name] = {
            "wall_s": wall,
            "tokens_per_s": args.requests * args.new_tokens / wall,
            "peak_pages": peak,
            "peak_pages_per_request": peak / args.requests,
        }
        print(name, json.dumps(result["runs"][name]), flush=True)
    firsts = [
        next((i for i, (a, b) in enumerate(zip(f, s, strict=True)) if a != b), len(f))
        for f, s in zip(outputs["full pages"], outputs["streaming"], strict=True)
    ]
    result["greedy_vs_full"] = {"tokens_before_first_difference": firsts}
    result["equal_to_generate_alone"] = [
        outputs["streaming"][i] == ssm_llm.generate(params, config, [prompts[i]], configs["streaming"]).tokens[0]
        for i in range(2)
    ]
    runs = result["runs"]
    result["pages_ratio"] = runs["full pages"]["peak_pages"] / runs["streaming"]["peak_pages"]
    result["speed_ratio"] = runs["streaming"]["tokens_per_s"] / runs["full pages"]["tokens_per_s"]
    summary = ("greedy_vs_full", "equal_to_generate_alone", "pages_ratio", "speed_ratio")
    print(json.dumps({k: result[k] for k in summary}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_engine_streaming.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
