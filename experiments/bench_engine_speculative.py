"""Prompt-lookup speculative decoding inside the serving engine against plain decoding, SmolLM2-135M, side by
side in one run: real chat requests that quote their prompt (a paragraph of Python's language reference to
repeat, then explain), greedy, at 1-8 requests at once; tokens per second (the median of `--repeats` timed
runs, the three settings interleaved so the shared machine's drift hits them alike), the share of draft
tokens accepted, and that all give the same tokens.

python experiments/bench_engine_speculative.py [--new-tokens 64] [--drafts 3 7] [--concurrency 1 2 4 8]
Writes experiments/results/bench_engine_speculative.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
from bench_runners import machine_info

import converters
import ssm_llm
from ssm_llm.serving import Engine

RESULTS = Path(__file__).parent / "results"


def quoting_prompts(tokenizer, count: int) -> list[list[int]]:
    names = sorted(topics)[:count]
    prompts = []
    for name in names:
        text = " ".join(topics[name].split()[:120])
        chat = [{"role": "user", "content": f"Repeat this text word for word, then explain it:\n\n{text}"}]
        prompts.append(tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--drafts", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = ssm_llm.default_model_path()
    config, params = converters.load(path, cache=True)
    tokenizer = converters.load_text_tokenizer(path)
    result = {"machine": machine_info(), "new_tokens": args.new_tokens, "runs": []}
    for concurrency in args.concurrency:
        prompts = quoting_prompts(tokenizer, concurrency)
        options = dict(max_slots=concurrency, page_size=16, max_len=512, chunk=64)
        settings = {}
        for drafts in [0, *args.drafts]:
            spec = ssm_llm.speculative.PromptLookup(num_tokens=drafts) if drafts else None
            gen_config = ssm_llm.GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=(), speculative=spec)
            Engine(params, config, **options).run_batch(prompts, gen_config)  # warm-up: compiled shapes
            settings[drafts] = {"config": gen_config, "walls": []}
        for _ in range(args.repeats):
            for setting in settings.values():
                engine = Engine(params, config, **options)
                start = time.perf_counter()
                setting["tokens"] = engine.run_batch(prompts, setting["config"])
                setting["walls"].append(time.perf_counter() - start)
                setting["stats"] = engine.stats()
        plain = concurrency * args.new_tokens / float(np.median(settings[0]["walls"]))
        for drafts, setting in settings.items():
            stats = setting["stats"]
            speed = concurrency * args.new_tokens / float(np.median(setting["walls"]))
            row = {
                "concurrency": concurrency,
                "drafts": drafts,
                "tokens_per_s": speed,
                "vs_plain": speed / plain,
                "accepted_fraction": stats["accepted_draft_tokens"] / max(stats["draft_tokens"], 1) if drafts else None,
                "same_tokens_as_plain": setting["tokens"] == settings[0]["tokens"],
            }
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_engine_speculative.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
