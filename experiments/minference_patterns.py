"""Fit MInference's per-head sparse patterns for SmolLM2-135M-Instruct (the paper's offline, kernel-aware
search) and ship them beside the package: `ssm_llm/kv/minference_patterns/SmolLM2-135M-Instruct.json`, which
`ssm_llm.kv.MInference.fitted("SmolLM2-135M-Instruct")` loads.

The sample is real English text (Python's language reference, from 75% of the way in: not the passkey haystack
nor the perplexity documents of `minference_eval.py`), `--length` tokens. For every layer and head, each pattern
("a_shape", "vertical_slash", "block_sparse") gets the same budget (`--blocks` key blocks of `--block` tokens +
`--columns` columns per query block), its indices are estimated online as `MInference` does, and the pattern that
keeps the most dense attention weight (averaged over the sample's queries) wins. The recalls go in the JSON.

    python experiments/minference_patterns.py            # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from bench_runners import machine_info  # noqa: E402
from kv_compression_eval import text_ids  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402
from ssm_llm.kv import MInference  # noqa: E402
from ssm_llm.kv.minference import PATTERNS  # noqa: E402
from ssm_llm.kv.minference_search import fit_patterns  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "ssm_llm" / "kv" / "minference_patterns" / "SmolLM2-135M-Instruct.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192, help="tokens of the fitting sample")
    parser.add_argument("--start", type=float, default=0.75, help="where in the reference text the sample starts")
    parser.add_argument("--block", type=int, default=MInference.block)
    parser.add_argument("--blocks", type=int, default=MInference.blocks)
    parser.add_argument("--columns", type=int, default=MInference.columns)
    parser.add_argument(
        "--scored", type=int, default=None, help="score the recall on the sample's last N queries (default: all)"
    )
    parser.add_argument("--min-recall", type=float, default=None, help="layers below it stay dense")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    tokens = text_ids(converters.load_tokenizer(path), args.length, args.start)[: args.length]
    start = time.perf_counter()
    settings = MInference(block=args.block, blocks=args.blocks, columns=args.columns)
    fitted, recalls = fit_patterns(params, config, tokens, settings, min_recall=args.min_recall, scored=args.scored)
    seconds = time.perf_counter() - start
    counts = {p: sum(layer.count(p) for layer in fitted.patterns) for p in PATTERNS}
    best = recalls.max(-1)
    fitted.save(
        args.out,
        model=path.name,
        sample=f"Python's language reference (pydoc_data.topics), {args.length} tokens from {args.start:.0%} on",
        seconds=round(seconds, 1),
        scored_queries=args.scored or args.length,
        min_recall=args.min_recall,
        machine=machine_info(),
        heads_per_pattern=counts,
        mean_recall={p: round(float(recalls[..., i].mean()), 4) for i, p in enumerate(PATTERNS)},
        mean_best_recall=round(float(best.mean()), 4),
        recalls=np.round(recalls, 4).tolist(),
    )
    print(f"{args.out}: {counts}; mean recall of each head's best pattern {best.mean():.3f} ({seconds:.0f} s)")
    for i, p in enumerate(PATTERNS):
        print(f"  {p:15s} mean recall {recalls[..., i].mean():.3f}")


if __name__ == "__main__":
    main()
