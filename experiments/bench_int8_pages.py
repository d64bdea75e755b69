"""Int8 pages against float32 pages in the serving engine, SmolLM2-135M, side by side in one run: bytes
per cached token, how many requests of a given length a pool of fixed bytes holds, decode throughput of a
batch of real chat requests, and how far the greedy outputs follow float32 pages' (tokens before the first
difference; identical outputs).

python experiments/bench_int8_pages.py [--requests 16] [--new-tokens 32]
Writes experiments/results/bench_int8_pages.json.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = ssm_llm.default_model_path()
    config, params = converters.load(path, cache=True)
    prompts = real_prompts(converters.load_text_tokenizer(path), args.requests, np.random.default_rng(0))
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=())
    options = dict(max_slots=args.requests, page_size=16, max_len=512, chunk=64)
    result = {"machine": machine_info(), "requests": args.requests, "new_tokens": args.new_tokens, "pages": {}}
    outputs = {}
    for name, dtype in (("float32", None), ("int8", "int8")):
        Engine(params, config, page_dtype=dtype, **options).run_batch(prompts, gen_config)  # warm-up
        engine = Engine(params, config, page_dtype=dtype, **options)
        start = time.perf_counter()
        outputs[name] = engine.run_batch(prompts, gen_config)
        wall = time.perf_counter() - start
        per_token = engine.stats()["cache_bytes"] / (engine.num_pages * engine.page_size)
        result["pages"][name] = {
            "bytes_per_token": per_token,
            "tokens_per_s": args.requests * args.new_tokens / wall,
            "wall_s": wall,
            "requests_of_1024_tokens_in_1_GiB": int(2**30 // (per_token * 1024)),
        }
        print(name, json.dumps(result["pages"][name]), flush=True)
    firsts = [
        next((i for i, (a, b) in enumerate(zip(f, q, strict=True)) if a != b), len(f))
        for f, q in zip(outputs["float32"], outputs["int8"], strict=True)
    ]
    result["greedy"] = {
        "identical_outputs": sum(f == len(o) for f, o in zip(firsts, outputs["float32"], strict=True)),
        "tokens_before_first_difference": firsts,
    }
    pages = result["pages"]
    result["bytes_ratio"] = pages["float32"]["bytes_per_token"] / pages["int8"]["bytes_per_token"]
    result["speed_ratio"] = pages["int8"]["tokens_per_s"] / pages["float32"]["tokens_per_s"]
    print(json.dumps({k: result[k] for k in ("greedy", "bytes_ratio", "speed_ratio")}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_int8_pages.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
