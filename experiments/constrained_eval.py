"""Structured output on SmolLM2-135M-Instruct: 50 generated JSON schemas, with and without the constraint.

Each schema (seeded: objects of 1-4 fields drawn from bounded strings, integer ranges, booleans, enums and
short integer arrays) is put in a chat prompt asking for a matching JSON object. Per schema, greedy, up to
--new-tokens tokens, stopping at EOS:
  * constrained: `GenerationConfig(constraint=JSONSchema(schema))`: is the output valid (json.loads +
    jsonschema), and its decode speed;
  * unconstrained (up to --plain-tokens), the compiled loop (the default path) and the streamed
    one-step-at-a-time loop the constraint runs in: how often the model alone writes valid JSON within that
    many tokens, and the speeds the constrained run is compared with.
Speeds are decode tokens / decode seconds of a second (compiled) call, summed over the schemas. One run writes
experiments/results/constrained_eval.{json,png} with the CPU model and its flags.

    .venv/bin/python experiments/constrained_eval.py [--schemas 50] [--new-tokens 96] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema
import numpy as np
from bench_runners import machine_info

import converters
import ssm_llm
from ssm_llm import constraints

NAMES = ["name", "city", "age", "score", "active", "tags", "color", "year", "id", "level"]


def random_schema(rng) -> dict:
    """An object schema of 1-4 required fields, each bounded so that a valid value always ends."""
    kinds = [
        lambda: {"type": "string", "maxLength": int(rng.integers(3, 16))},
        lambda: (lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(1, 1000))})(
            int(rng.integers(-100, 100))
        ),
        lambda: {"type": "boolean"},
        lambda: {
            "enum": sorted(
                rng.choice(["red", "green", "blue", "small", "large", "yes", "no"], 3, replace=False).tolist()
            )
        },
        lambda: {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    ]
    names = rng.choice(NAMES, int(rng.integers(1, 5)), replace=False).tolist()
    props = {n: kinds[int(rng.integers(len(kinds)))]() for n in names}
    return {"type": "object", "properties": props, "required": names, "additionalProperties": False}


def schema_prompt(tokenizer, schema: dict) -> list[int]:
    """The chat prompt's token ids asking for a JSON object with `schema`'s fields."""
    message = f"Reply with a JSON object with the fields {', '.join(schema['required'])}. Schema: {json.dumps(schema)}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=96, help="the constrained runs' limit")
    parser.add_argument(
        "--plain-tokens", type=int, default=48, help="the unconstrained runs' limit (they rarely stop: speed reference)"
    )
    parser.add_argument("--quick", action="store_true", help="3 schemas, 32 tokens (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "constrained_eval.json"))
    args = parser.parse_args()
    if args.quick:
        args.schemas, args.new_tokens, args.plain_tokens = 3, 32, 16

    path = ssm_llm.default_model_path()
    tokenizer = converters.load_tokenizer(path)
    config, params = converters.load(path)
    # The default (stacked) layout: every schema's prompt length is a new shape, and the unrolled layout's
    # compiles (several seconds each) would dominate the run.
    eos = tuple(sorted(set(config.eos_token_ids) | {tokenizer.eos_token_id} - {None}))
    bound = constraints.tokenizer(tokenizer, eos)
    rng = np.random.default_rng(0)

    rows = []
    for i in range(args.schemas):
        schema = random_schema(rng)
        ids = schema_prompt(tokenizer, schema)
        start = time.perf_counter()
        constraint = constraints.JSONSchema(schema, bound)
        compile_s = time.perf_counter() - start
        row = {"schema": schema, "grammar_compile_s": compile_s}
        for name, kw in {
            "constrained": {"constraint": constraint},
            "plain": {},
            "plain_streamed": {"stream": lambda step, tokens: None},
        }.items():
            stream = kw.pop("stream", None)
            limit = args.new_tokens if name == "constrained" else args.plain_tokens
            gen = ssm_llm.GenerationConfig(max_new_tokens=limit, eos_token_ids=eos, **kw)
            ssm_llm.generate(params, config, [ids], gen, on_token=stream)  # compile (or reuse) the programs
            out = ssm_llm.generate(params, config, [ids], gen, on_token=stream)
            value = tokenizer.decode(out.tokens[0])
            row[name] = {
                "tokens": len(out.tokens[0]),
                "decode_s": out.decode_seconds,
                "valid": valid(value, schema),
                "finish": out.finish_reasons[0],
                "text": value,
            }
        rows.append(row)
        print(
            i,
            json.dumps(
                {
                    k: {x: v[x] for x in ("tokens", "valid", "finish")}
                    for k, v in row.items()
                    if isinstance(v, dict) and "valid" in v
                }
            ),
            flush=True,
        )

    summary = {}
    for name in ("constrained", "plain", "plain_streamed"):
        tokens = sum(r[name]["tokens"] for r in rows)
        seconds = sum(r[name]["decode_s"] for r in rows)
        summary[name] = {
            "valid": f"{sum(r[name]['valid'] for r in rows)}/{len(rows)}",
            "tokens": tokens,
            "tok_per_s": tokens / seconds,
        }
    summary["constrained_slowdown_vs_plain"] = summary["plain"]["tok_per_s"] / summary["constrained"]["tok_per_s"]
    summary["constrained_slowdown_vs_streamed"] = (
        summary["plain_streamed"]["tok_per_s"] / summary["constrained"]["tok_per_s"]
    )
    summary["grammar_compile_s_median"] = float(np.median([r["grammar_compile_s"] for r in rows]))
    print(json.dumps(summary, indent=1))
    out = {
        "machine": machine_info(),
        "new_tokens": args.new_tokens,
        "plain_tokens": args.plain_tokens,
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["plain", "plain_streamed", "constrained"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [summary[n]["tok_per_s"] for n in names], color=["#888", "#aaa", "#3a7"])
    for i, n in enumerate(names):
        ax.text(i, summary[n]["tok_per_s"], f"valid {summary[n]['valid']}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"SmolLM2-135M, {len(rows)} JSON schemas, greedy")
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
