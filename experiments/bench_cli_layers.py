"""`ssm-llm generate` end to end in each layer layout (`--layers stacked | unrolled`), as a user runs it
again and again: fresh processes sharing one cache (the converted model and the compiled programs), after
one warm-up run per layout, for several output lengths (a chat prompt asking for a long story, streamed,
as the CLI prints by default). Unrolled layers decode faster on CPU but compile
longer; this measures whether a cached CLI run wins that back, which decides the CLI's default layout (float32
weights, `--quantize none`).

    python experiments/bench_cli_layers.py            # -> results/bench_cli_layers.json (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench_runners import machine_info
from bench_startup import run_cli

RESULTS = Path(__file__).parent / "results"
PROMPT = "Write a long story about a dragon who learns to cook."  # long answers: EOS comes late
LAYOUTS = ("stacked", "unrolled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_cli_layers.json")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ssm_llm_layers_") as tmp:
        cache = Path(tmp)
        for layout in LAYOUTS:  # warm-up: convert the model once, compile each layout's programs once
            for n in args.new_tokens:
                run_cli(cache, ["--prompt", PROMPT, "--layers", layout, "--quantize", "none"], n)
        for n in args.new_tokens:
            runs = {layout: [] for layout in LAYOUTS}
            for _ in range(args.repeats):  # interleaved
                for layout in LAYOUTS:
                    runs[layout].append(
                        run_cli(cache, ["--prompt", PROMPT, "--layers", layout, "--quantize", "none"], n)
                    )
            rows[n] = {
                layout: {
                    "wall_s": statistics.median(r["wall_s"] for r in got),
                    "compile_s": statistics.median(r["breakdown_s"].get("compile", 0.0) for r in got),
                    "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] or 0.0 for r in got),
                    "new_tokens": got[0]["new_tokens"],
                }
                for layout, got in runs.items()
            }
            rows[n]["unrolled_wall_over_stacked"] = rows[n]["unrolled"]["wall_s"] / rows[n]["stacked"]["wall_s"]
    report = {"machine": machine_info(), "prompt": PROMPT, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{'new tokens':>10} {'layout':>9} {'wall s':>7} {'compile s':>9} {'decode tok/s':>12}")
    for n, row in rows.items():
        for layout in LAYOUTS:
            r = row[layout]
            print(f"{n:>10} {layout:>9} {r['wall_s']:7.2f} {r['compile_s']:9.2f} {r['decode_tok_per_s']:12.1f}")
        print(f"{'':>10} unrolled / stacked wall: {row['unrolled_wall_over_stacked']:.2f}")


if __name__ == "__main__":
    main()
