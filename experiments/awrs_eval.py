"""Constrained sampling by masking vs by rejection (AWRS) on SmolLM2-135M-Instruct: constraint evaluations per
token, fallbacks to the full mask, decode time, and whether the two draw the same tokens.

The prompts and schemas are constrained_eval.py's (the same seeded generator: chat prompts asking for a JSON
object matching a schema of 1-4 bounded fields). Per schema and per temperature (0: greedy; 1.0: sampled, one
seed per schema), both methods run twice (the second call is timed) up to --new-tokens tokens, stopping at
EOS. `GenerationResult.constraint_evaluations` counts a mask as the tokenizer's 49152 tokens and a rejection
check as one; a rejection run's full masks (its fallbacks, when none of the 16 best perturbed tokens was
allowed) are its evaluations // 49152, its single checks the rest (exact while a run makes fewer than 49152
single checks: at most 16 per token). One run writes experiments/results/awrs_eval.{json,png} with the CPU
model and its flags.

    .venv/bin/python experiments/awrs_eval.py [--schemas 50] [--new-tokens 96] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_runners import machine_info
from constrained_eval import random_schema, schema_prompt, valid

import converters
import ssm_llm
from ssm_llm import constraints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="3 schemas, 32 tokens (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "awrs_eval.json"))
    args = parser.parse_args()
    if args.quick:
        args.schemas, args.new_tokens = 3, 32

    path = ssm_llm.default_model_path()
    tokenizer = converters.load_tokenizer(path)
    config, params = converters.load(path)
    eos = tuple(sorted(set(config.eos_token_ids) | {tokenizer.eos_token_id} - {None}))
    bound = constraints.tokenizer(tokenizer, eos)
    vocab = bound.vocab_size
    rng = np.random.default_rng(0)  # constrained_eval.py's schemas

    rows = []
    for i in range(args.schemas):
        schema = random_schema(rng)
        ids = schema_prompt(tokenizer, schema)
        constraint = constraints.JSONSchema(schema, bound)
        row = {"schema": schema}
        for temperature in (0.0, 1.0):
            runs = {}
            for how in ("mask", "awrs"):
                gen = ssm_llm.GenerationConfig(
                    max_new_tokens=args.new_tokens,
                    eos_token_ids=eos,
                    constraint=constraint,
                    constrained_sampling=how,
                    temperature=temperature,
                    seed=i,
                    max_len=512,  # one cache shape for every prompt: one compiled decode step
                )
                ssm_llm.generate(params, config, [ids], gen)  # compile (or reuse) the programs
                out = ssm_llm.generate(params, config, [ids], gen)
                runs[how] = {
                    "tokens": out.tokens[0],
                    "decode_s": out.decode_seconds,
                    "evaluations": out.constraint_evaluations,
                    "valid": valid(tokenizer.decode(out.tokens[0]), schema),
                }
            awrs = runs["awrs"]
            awrs["full_masks"], awrs["single_checks"] = divmod(awrs["evaluations"], vocab)
            row[f"t{temperature:g}"] = {**runs, "same_tokens": runs["mask"]["tokens"] == awrs["tokens"]}
        rows.append(row)
        print(
            i,
            {
                t: {
                    "n": len(row[t]["awrs"]["tokens"]),
                    "same": row[t]["same_tokens"],
                    "checks": row[t]["awrs"]["single_checks"],
                    "masks": row[t]["awrs"]["full_masks"],
                }
                for t in ("t0", "t1")
            },
            flush=True,
        )

    summary = {}
    for t in ("t0", "t1"):
        tokens = {how: sum(len(r[t][how]["tokens"]) for r in rows) for how in ("mask", "awrs")}
        seconds = {how: sum(r[t][how]["decode_s"] for r in rows) for how in ("mask", "awrs")}
        evals = {how: sum(r[t][how]["evaluations"] for r in rows) for how in ("mask", "awrs")}
        summary[t] = {
            "same_tokens": f"{sum(r[t]['same_tokens'] for r in rows)}/{len(rows)}",
            "valid": {how: f"{sum(r[t][how]['valid'] for r in rows)}/{len(rows)}" for how in ("mask", "awrs")},
            "tokens": tokens,
            "evaluations_per_token": {how: evals[how] / tokens[how] for how in ("mask", "awrs")},
            "awrs_single_checks_per_token": sum(r[t]["awrs"]["single_checks"] for r in rows) / tokens["awrs"],
            "awrs_full_masks_per_token": sum(r[t]["awrs"]["full_masks"] for r in rows) / tokens["awrs"],
            "tok_per_s": {how: tokens[how] / seconds[how] for how in ("mask", "awrs")},
        }
    print(json.dumps(summary, indent=1))
    out = {"machine": machine_info(), "new_tokens": args.new_tokens, "vocab": vocab, "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["greedy", "temperature 1"]
    x = np.arange(2)
    for k, how in enumerate(("mask", "awrs")):
        values = [summary[t]["evaluations_per_token"][how] for t in ("t0", "t1")]
        ax.bar(x + 0.38 * k, values, 0.38, label=how, color=["#888", "#3a7"][k])
        for xi, v in zip(x, values, strict=True):
            ax.text(xi + 0.38 * k, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x + 0.19, labels)
    ax.set_ylabel("constraint evaluations / token")
    ax.set_title(f"SmolLM2-135M, {len(rows)} JSON schemas")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
