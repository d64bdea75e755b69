"""Greedy constrained decoding with and without speculative drafts on SmolLM2-135M-Instruct: the same tokens?
how many tokens per target forward (after the prefill's first token; EOS counted), and decode speed.

The prompts and schemas are constrained_eval.py's (the same seeded generator: chat prompts asking for a JSON
object matching a schema of 1-4 bounded fields; the schema is in the prompt, so prompt lookup can copy its
keys). Per schema, greedy constrained decoding by masks ("plain"), then with `PromptLookup()`,
`TokenRecycling()` and `ForcedTokens()` (the grammar's own forced tokens) drafts, pruned by the grammar, the
target's token at each node the best allowed one; up to --new-tokens tokens, stopping at EOS. Also counted: how
many of plain decoding's tokens the grammar forced (`Matchers.forced` along each output), in how many runs.
Every method runs once on the first schema to compile (max_len fixed so that every prompt shares the
programs), then once per schema, timed. One run writes
experiments/results/constrained_speculative_eval.{json,png} with the CPU model and its flags.

    .venv/bin/python experiments/constrained_speculative_eval.py [--schemas 20] [--new-tokens 96] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_runners import machine_info
from constrained_eval import random_schema, schema_prompt, valid

import converters
import ssm_llm
from ssm_llm import constraints
from ssm_llm.constrained_speculation import ForcedTokens
from ssm_llm.speculative import PromptLookup, TokenRecycling

DRAFTERS = {
    "plain": lambda: None,
    "prompt_lookup": PromptLookup,
    "token_recycling": TokenRecycling,
    "forced_tokens": ForcedTokens,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="2 schemas, 24 tokens (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "constrained_speculative_eval.json"))
    args = parser.parse_args()
    if args.quick:
        args.schemas, args.new_tokens = 2, 24
    start = time.perf_counter()

    path = ssm_llm.default_model_path()
    tokenizer = converters.load_tokenizer(path)
    config, params = converters.load(path)
    eos = tuple(sorted(set(config.eos_token_ids) | {tokenizer.eos_token_id} - {None}))
    bound = constraints.tokenizer(tokenizer, eos)
    rng = np.random.default_rng(0)  # constrained_eval.py's schemas
    schemas = [random_schema(rng) for _ in range(args.schemas)]

    def run(schema, how):
        gen = ssm_llm.GenerationConfig(
            max_new_tokens=args.new_tokens,
            eos_token_ids=eos,
            constraint=constraints.JSONSchema(schema, bound),
            speculative=DRAFTERS[how](),
            max_len=512,  # one cache shape for every prompt: one compiled decode step
        )
        return ssm_llm.generate(params, config, [schema_prompt(tokenizer, schema)], gen)

    for how in DRAFTERS:  # compile
        run(schemas[0], how)
    rows = []
    for i, schema in enumerate(schemas):
        row = {"schema": schema}
        for how in DRAFTERS:
            out = run(schema, how)
            stats = out.speculative
            row[how] = {
                "tokens": out.tokens[0],
                "decode_s": out.decode_seconds,
                # after the prefill's token, each new token (its EOS included) takes a forward without drafts
                "after_first": len(out.tokens[0]) - (out.finish_reasons[0] != "eos"),
                "forwards": len(out.tokens[0]) - (out.finish_reasons[0] != "eos") if stats is None else stats.rounds[0],
                "valid": valid(tokenizer.decode(out.tokens[0]), schema),
            }
        for how in DRAFTERS:
            row[how]["same_tokens"] = row[how]["tokens"] == row["plain"]["tokens"]
        rows.append(row)
        print(i, {how: (len(row[how]["tokens"]), row[how]["forwards"], row[how]["same_tokens"]) for how in DRAFTERS})

    forced, runs = 0, 0
    for row in rows:  # how much of each plain output the grammar forced
        matcher = constraints.Matchers(constraints.JSONSchema(row["schema"], bound), 1, config.vocab_size, eos)
        ids, i = row["plain"]["tokens"], 0
        while i < len(ids):
            run = matcher.forced(0)
            k = next((j for j, t in enumerate(run) if i + j >= len(ids) or ids[i + j] != t), len(run))
            for token in ids[i : i + max(k, 1)]:
                matcher.consume(0, token)
            forced, runs, i = forced + k, runs + (k > 0), i + max(k, 1)
    summary = {"forced_by_grammar": {"tokens": forced, "runs": runs}}
    for how in DRAFTERS:
        tokens = sum(len(r[how]["tokens"]) for r in rows)
        seconds = sum(r[how]["decode_s"] for r in rows)
        summary[how] = {
            "same_tokens": f"{sum(r[how]['same_tokens'] for r in rows)}/{len(rows)}",
            "valid": f"{sum(r[how]['valid'] for r in rows)}/{len(rows)}",
            "tokens": tokens,
            "tokens_per_forward": sum(r[how]["after_first"] for r in rows) / sum(r[how]["forwards"] for r in rows),
            "tok_per_s": tokens / seconds,
        }
    for how in DRAFTERS:
        summary[how]["speedup"] = summary[how]["tok_per_s"] / summary["plain"]["tok_per_s"]
    print(json.dumps(summary, indent=1))
    out = {
        "script": "experiments/constrained_speculative_eval.py",
        "machine": machine_info(),
        "new_tokens": args.new_tokens,
        "summary": summary,
        "rows": rows,
        "total_wall_s": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    names = list(DRAFTERS)
    for ax, key, label in zip(
        axes, ("tokens_per_forward", "tok_per_s"), ("tokens / target forward", "tokens / s"), strict=True
    ):
        values = [summary[how][key] for how in names]
        ax.bar(names, values, color=["#888", "#3a7", "#37a", "#a73"])
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(f"SmolLM2-135M, greedy JSON under {len(rows)} schemas")
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
