"""What `ssm-llm generate` gives with no options, against float32: the default `--quantize auto` (int8 where
this host's measurement says its products are faster) and `--quantize none`, as a user runs them: a first run
on an empty cache (convert, quantize, store; the int8 measurement is taken there too), then fresh processes
sharing the cache, interleaved, for several output lengths (a chat prompt asking for a long story).

    python experiments/bench_cli_default.py        # -> results/bench_cli_default.json (~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench_runners import machine_info
from bench_startup import run_cli

RESULTS = Path(__file__).parent / "results"
PROMPT = "Write a long story about a dragon who learns to cook."
VARIANTS = {"float32 (--quantize none)": ["--quantize", "none"], "default (--quantize auto)": ["--quantize", "auto"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_cli_default.json")
    args = parser.parse_args()
    if os.environ.pop("SSM_LLM_INT8", None) is not None:
        print("ignoring $SSM_LLM_INT8: the default is measured")
    first, rows, texts = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="ssm_llm_default_") as tmp:
        for name, extra in VARIANTS.items():  # each variant's first run, on its own empty cache
            got = run_cli(Path(tmp) / name.split()[0], ["--prompt", PROMPT, *extra], args.new_tokens[0])
            first[name] = {"wall_s": got["wall_s"], "breakdown_s": got["breakdown_s"], "speed_line": got["speed_line"]}
        for n in args.new_tokens:
            runs = {name: [] for name in VARIANTS}
            for _ in range(args.repeats):  # interleaved
                for name, extra in VARIANTS.items():
                    runs[name].append(run_cli(Path(tmp) / name.split()[0], ["--prompt", PROMPT, *extra], n))
            rows[n] = {
                name: {
                    "wall_s": statistics.median(r["wall_s"] for r in got),
                    "load_s": statistics.median(r["breakdown_s"].get("load", 0.0) for r in got),
                    "compile_s": statistics.median(r["breakdown_s"].get("compile", 0.0) for r in got),
                    "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] or 0.0 for r in got),
                    "new_tokens": got[0]["new_tokens"],
                    "speed_line": got[0]["speed_line"],
                }
                for name, got in runs.items()
            }
            texts[n] = {name: got[0]["text"] for name, got in runs.items()}
        record = Path(tmp) / "default" / "int8_choice.json"
        choice = json.loads(record.read_text()) if record.is_file() else None
    report = {
        "machine": machine_info(),
        "prompt": PROMPT,
        "repeats": args.repeats,
        "int8_choice": choice,
        "first_run": first,
        "rows": rows,
        "texts": texts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if choice:
        print(f"int8 measurement: float32 {choice['float32_ms']:.2f} ms, int8 {choice['int8_ms']:.2f} ms")
    for name, r in first.items():
        print(f"first run {name}: {r['wall_s']:.1f} s ({r['speed_line'][-1]})")
    print(f"{'new tokens':>10} {'variant':>27} {'wall s':>7} {'load s':>7} {'compile s':>9} {'decode tok/s':>12}")
    for n, row in rows.items():
        for name in VARIANTS:
            r = row[name]
            print(
                f"{n:>10} {name:>27} {r['wall_s']:7.2f} {r['load_s']:7.2f} {r['compile_s']:9.2f} "
                f"{r['decode_tok_per_s']:12.1f}"
            )


if __name__ == "__main__":
    main()
