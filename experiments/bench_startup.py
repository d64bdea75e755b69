"""Start-up time of the command line, as a user meets it: `ssm-llm generate` on the embedded SmolLM2 run as
a fresh process with an empty cache (the first run: conversion and compilation), then again (the second
run: the converted model and the compiled programs read from the cache), then with caching off.

For each run: the process's wall time, the time to its first byte of generated text (streamed), and the
CLI's own `--verbose` breakdown (load, tokenizer, compile, prefill, decode, other). Targets (issue 28, the
2-core CPU): second run first token <= 2.5 s and total <= 4 s for 16 tokens; the first run no slower
than with caching off.

    python experiments/bench_startup.py            # -> results/bench_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_runners import machine_info

RESULTS = Path(__file__).parent / "results"
PROMPT = "What is the capital of France? Answer in one sentence."


def run_cli(cache: Path, extra: list[str], new_tokens: int) -> dict:
    """One `python -m ssm_llm_cli generate` process: wall and first-output seconds, and its breakdown."""
    env = {**os.environ, "SSM_LLM_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    args = ["generate", "--chat", "--prompt", PROMPT, "--max-new-tokens", str(new_tokens), "--verbose", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssm_llm_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    first = []

    def watch():
        byte = proc.stdout.read(1)
        first.append(time.perf_counter() - start if byte else None)
        rest = proc.stdout.read()
        first.append((byte + rest).decode(errors="replace"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    stderr = proc.stderr.read().decode(errors="replace")
    proc.wait(timeout=600)
    watcher.join(timeout=60)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ssm-llm generate failed ({proc.returncode}): {stderr[-2000:]}")
    breakdown = re.search(r"\[([\d.]+) s = (.*)\]", stderr)
    parts = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.-]+)", breakdown.group(2))) if breakdown else {}
    line = re.search(r"\[(\d+) prompt tokens, (\d+) new .*decode ([\d.]+) tok/s\]", stderr)
    return {
        "wall_s": wall,
        "first_text_s": first[0],
        "in_process_s": float(breakdown.group(1)) if breakdown else None,
        "breakdown_s": parts,
        "new_tokens": int(line.group(2)) if line else None,
        "decode_tok_per_s": float(line.group(3)) if line else None,
        "text": first[1] if len(first) > 1 else "",
        "speed_line": stderr.strip().splitlines()[-2:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_startup.json")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="ssm_llm_startup_") as tmp:
        cache = Path(tmp)
        runs["first run (empty cache)"] = run_cli(cache, [], args.new_tokens)
        runs["second run (cached)"] = run_cli(cache, [], args.new_tokens)
        runs["third run (cached)"] = run_cli(cache, [], args.new_tokens)
        runs["caching off"] = run_cli(cache, ["--no-cache"], args.new_tokens)  # the model; compiled programs stay
        off_env = os.environ.get("SSM_LLM_NO_CACHE")
        os.environ["SSM_LLM_NO_CACHE"] = "1"
        try:
            runs["caching off (model and compilation)"] = run_cli(Path(tmp) / "unused", [], args.new_tokens)
        finally:
            if off_env is None:
                del os.environ["SSM_LLM_NO_CACHE"]
            else:
                os.environ["SSM_LLM_NO_CACHE"] = off_env
    report = {"machine": machine_info(), "prompt": PROMPT, "new_tokens": args.new_tokens, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{'run':38} {'wall s':>7} {'first text s':>12} {'load':>6} {'tok':>6} {'compile':>8} {'decode tok/s':>12}")
    for name, r in runs.items():
        b = r["breakdown_s"]
        print(
            f"{name:38} {r['wall_s']:7.2f} {r['first_text_s'] or float('nan'):12.2f} {b.get('load', 0):6.2f} "
            f"{b.get('tokenizer', 0):6.2f} {b.get('compile', 0):8.2f} {r['decode_tok_per_s'] or 0:12.1f}"
        )


if __name__ == "__main__":
    main()
