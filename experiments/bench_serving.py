"""Serving benchmark on SmolLM2-135M: the continuous-batching engine against `generate` per request and
static batches of `generate`, on a Poisson stream of real prompts; and a shared-prefix workload (a long
system prompt + short questions) with and without prefix caching.

Prompts are paragraphs of Python's language reference (`pydoc_data`, on every machine) in SmolLM2's chat
template, asked to be summarised; every request decodes `--new-tokens` tokens greedily (EOS ignored, so
all three ways do the same work). Times are wall-clock on this machine, after a warm-up of every compiled
shape. Writes experiments/results/bench_serving.json and .png.

python experiments/bench_serving.py [--concurrency 1 8 32] [--new-tokens 32] [--quick]
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


def real_prompts(tokenizer, count: int, rng) -> list[list[int]]:
    """Chat prompts of mixed lengths (about 40-300 tokens): a paragraph of the language reference to sum up."""
    paragraphs = [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if len(p.strip()) > 80]
    prompts = []
    for i in rng.choice(len(paragraphs), count, replace=False):
        text = paragraphs[i][: int(rng.integers(100, 1200))]
        chat = [{"role": "user", "content": f"Summarise in one sentence:\n{text}"}]
        prompts.append(tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False))
    return prompts


def percentiles(values) -> dict:
    values = np.asarray(values, float)
    if not values.size:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def run_engine(engine: Engine, prompts, arrivals, gen_config) -> dict:
    """Submit each prompt at its arrival time (seconds from the start) and step until all finish."""
    start = time.perf_counter()
    submitted, first, last, gaps, tokens, page_ratio = {}, {}, {}, [], 0, 0.0
    pending = list(range(len(prompts)))
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            submitted[engine.submit(prompts[i], gen_config)] = arrivals[i]
        if not engine.has_work():
            time.sleep(max(0.0, arrivals[pending[0]] - now))
            continue
        events = engine.step()
        now = time.perf_counter() - start
        stats = engine.stats()
        if engine.paged and stats["tokens_held"]:
            page_ratio = max(page_ratio, stats["pages_used"] * engine.page_size / stats["tokens_held"])
        for event in events:
            if not event.new_token_ids:
                continue
            tokens += len(event.new_token_ids)
            if event.rid not in first:
                first[event.rid] = now - submitted[event.rid]
            else:
                gaps.append(now - last[event.rid])
            last[event.rid] = now
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles(list(first.values())),
        "itl_s": percentiles(gaps),
        "peak_page_positions_per_held_token": page_ratio,
        "stats": engine.stats(),
    }


def run_per_request(params, config, prompts, arrivals, gen_config) -> dict:
    """`generate` of one request at a time, in arrival order (a request waits for the previous one)."""
    start = time.perf_counter()
    ttft, tokens = [], 0
    for prompt, arrival in zip(prompts, arrivals, strict=True):
        time.sleep(max(0.0, arrival - (time.perf_counter() - start)))
        out = ssm_llm.generate(params, config, [prompt], gen_config)
        tokens += len(out.tokens[0])
        ttft.append(time.perf_counter() - start - arrival - out.decode_seconds)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_s": percentiles(ttft)}


def run_static(params, config, prompts, arrivals, gen_config, size: int) -> dict:
    """Static batches of `size` requests in arrival order: a batch starts when its last request has
    arrived and the previous batch is done."""
    start = time.perf_counter()
    ttft, tokens = [], 0
    for at in range(0, len(prompts), size):
        batch = slice(at, at + size)
        time.sleep(max(0.0, max(arrivals[batch]) - (time.perf_counter() - start)))
        out = ssm_llm.generate(params, config, prompts[batch], gen_config)
        tokens += sum(len(t) for t in out.tokens)
        done_prefill = time.perf_counter() - start - out.decode_seconds
        ttft += [done_prefill - a for a in arrivals[batch]]
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_s": percentiles(ttft)}


def shared_prefix(params, config, tokenizer, args) -> dict:
    """A ~1,000-token system prompt + short questions, 8 requests arriving together: prefill skipped and
    time to first token with and without prefix caching."""
    system = " ".join(topics["assert"].split() + topics["assignment"].split())
    words = system.split()
    questions = [
        "What does assert do?",
        "Name one augmented assignment.",
        "Can assignment unpack?",
        "What is a target list?",
        "When is AssertionError raised?",
        "What does __debug__ mean?",
        "Is x = y = 1 allowed?",
        "What is a starred target?",
    ][: 4 if args.quick else 8]
    prompts = []
    for question in questions:
        chat = [{"role": "system", "content": " ".join(words[:650])}, {"role": "user", "content": question}]
        prompts.append(tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False))
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=8, eos_token_ids=())
    out = {"prompt_tokens": [len(p) for p in prompts]}
    for caching in (False, True):
        engine = Engine(
            params, config, max_slots=len(prompts), page_size=16, max_len=1280, chunk=128, prefix_caching=caching
        )
        engine.run_batch(prompts[:2], gen_config)  # warm-up: compiles the shapes (and fills nothing shared)
        engine = Engine(
            params, config, max_slots=len(prompts), page_size=16, max_len=1280, chunk=128, prefix_caching=caching
        )
        start = time.perf_counter()
        first = {}
        rids = {engine.submit(prompts[0], gen_config): 0}
        while engine.has_work():  # the first request alone fills the cache; the rest arrive after its prefill
            for event in engine.step():
                if event.new_token_ids and event.rid not in first:
                    first[event.rid] = time.perf_counter() - start
            if len(rids) == 1 and first:
                arrived = time.perf_counter() - start
                rids.update({engine.submit(p, gen_config): arrived for p in prompts[1:]})
        followers = [first[r] - at for r, at in rids.items() if at]
        hits = engine.stats()["prefix_cache_hit_tokens"]
        out["cached" if caching else "uncached"] = {
            "follower_ttft_s": percentiles(followers),
            "prefill_tokens_skipped": hits,
            "shared_prefill_skipped_fraction": hits / sum(len(p) for p in prompts[1:]),
            "wall_s": time.perf_counter() - start,
        }
    out["ttft_speedup_p50"] = out["uncached"]["follower_ttft_s"]["p50"] / out["cached"]["follower_ttft_s"]["p50"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests per second")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    path = ssm_llm.default_model_path()
    config, params = converters.load(path, cache=True)
    tokenizer = converters.load_text_tokenizer(path)
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=())
    result = {"machine": machine_info(), "model": path.name, "new_tokens": args.new_tokens, "rate": args.rate}
    rng = np.random.default_rng(0)
    runs = []
    for concurrency in args.concurrency:
        count = 4 if args.quick else max(8, 2 * concurrency)
        prompts = real_prompts(tokenizer, count, rng)
        arrivals = np.cumsum(rng.exponential(1 / args.rate, count))
        make = lambda c=concurrency: Engine(params, config, max_slots=c, page_size=16, max_len=512, chunk=64)  # noqa: E731
        for warm in (np.zeros(count), arrivals):  # warm-up: the shapes of this workload (all at once; as timed)
            run_engine(make(), prompts, warm, gen_config)
        for prompt in prompts:  # warm-up of generate's shapes
            ssm_llm.generate(params, config, [prompt], gen_config)
        for at in range(0, count, concurrency):
            ssm_llm.generate(params, config, prompts[at : at + concurrency], gen_config)
        row = {
            "concurrency": concurrency,
            "requests": count,
            "prompt_tokens": percentiles([len(p) for p in prompts]),
            "engine": run_engine(make(), prompts, arrivals, gen_config),
            "generate_per_request": run_per_request(params, config, prompts, arrivals, gen_config),
            "generate_static_batches": run_static(params, config, prompts, arrivals, gen_config, concurrency),
        }
        row["throughput_vs_per_request"] = row["engine"]["tokens_per_s"] / row["generate_per_request"]["tokens_per_s"]
        row["throughput_vs_static"] = row["engine"]["tokens_per_s"] / row["generate_static_batches"]["tokens_per_s"]
        print(json.dumps({k: row[k] for k in ("concurrency", "throughput_vs_per_request", "throughput_vs_static")}))
        runs.append(row)
    result["runs"] = runs
    result["shared_prefix"] = shared_prefix(params, config, tokenizer, args)
    print(json.dumps({"shared_prefix": result["shared_prefix"]}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    name = "bench_serving_quick" if args.quick else "bench_serving"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    x = [r["concurrency"] for r in runs]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("engine", "engine"),
        ("generate_per_request", "generate per request"),
        ("generate_static_batches", "static batches"),
    ):
        ax[0].plot(x, [r[key]["tokens_per_s"] for r in runs], "o-", label=label)
        ax[1].plot(x, [r[key]["ttft_s"]["p50"] for r in runs], "o-", label=label)
    ax[0].set(xlabel="concurrent requests", ylabel="tokens / s", xscale="log", title="throughput")
    ax[1].set(xlabel="concurrent requests", ylabel="seconds", xscale="log", yscale="log", title="TTFT p50")
    ax[0].legend()
    fig.suptitle(f"SmolLM2-135M serving, {result['machine'].get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
