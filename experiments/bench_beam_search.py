"""Beam search on SmolLM2-135M-Instruct: ssm_llm against transformers' `num_beams`, side by side.

For each beam count (1 = greedy), chat prompts (batch 1, stopping at EOS or --new-tokens): wall seconds of
each library's generate (ours timed on a second, compiled call), whether the best hypotheses are the same
tokens, and the best hypothesis' score (sum of log-probabilities / length, transformers' default). One run
writes experiments/results/bench_beam_search.json with the CPU model and its flags.

    .venv/bin/python experiments/bench_beam_search.py [--beams 1 2 4 8] [--new-tokens 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_runners import machine_info
from transformers import AutoModelForCausalLM

import converters
import ssm_llm

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Give me three tips for sleeping better.",
    "Explain what a black hole is to a ten-year-old.",
    "Write a haiku about autumn leaves.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 16 tokens, beams 1 and 3 (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_beam_search.json"))
    args = parser.parse_args()
    if args.quick:
        args.beams, args.new_tokens = [1, 3], 16
    prompts = PROMPTS[:2] if args.quick else PROMPTS

    path = ssm_llm.default_model_path()
    tokenizer = converters.load_tokenizer(path)
    config, params = converters.load(path)
    # The default (stacked) layout, as `generate` and the CLI use it.
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    eos = tuple(sorted(set(config.eos_token_ids) | {tokenizer.eos_token_id} - {None}))

    def encode(message):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids

    rows = []
    for beams in args.beams:
        for i, message in enumerate(prompts):
            ids = encode(message)
            gen = ssm_llm.GenerationConfig(max_new_tokens=args.new_tokens, num_beams=beams, eos_token_ids=eos)
            ssm_llm.generate(params, config, [ids], gen)  # compile
            start = time.perf_counter()
            ours = ssm_llm.generate(params, config, [ids], gen)
            ours_s = time.perf_counter() - start
            with torch.no_grad():
                start = time.perf_counter()
                ref = hf.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                    max_new_tokens=args.new_tokens,
                    num_beams=beams,
                    do_sample=False,
                    eos_token_id=list(eos),
                    pad_token_id=eos[0],
                    output_scores=beams > 1,
                    return_dict_in_generate=True,
                )
                hf_s = time.perf_counter() - start
            theirs = ref.sequences[0, len(ids) :].tolist()
            theirs = theirs[: next((j for j, t in enumerate(theirs) if t in eos), len(theirs))]
            row = {
                "beams": beams,
                "prompt": i,
                "new_tokens": len(ours.tokens[0]),
                "ours_s": ours_s,
                "transformers_s": hf_s,
                "speedup": hf_s / ours_s,
                "same_tokens": ours.tokens[0] == theirs,
                "score": ours.beams.scores[0][0] if beams > 1 else None,
                "transformers_score": float(ref.sequences_scores[0]) if beams > 1 else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    summary = {}
    for beams in args.beams:
        mine = [r for r in rows if r["beams"] == beams]
        summary[str(beams)] = {
            "ours_s": float(np.sum([r["ours_s"] for r in mine])),
            "transformers_s": float(np.sum([r["transformers_s"] for r in mine])),
            "speedup": float(np.sum([r["transformers_s"] for r in mine]) / np.sum([r["ours_s"] for r in mine])),
            "same_tokens": f"{sum(r['same_tokens'] for r in mine)}/{len(mine)}",
        }
        print(beams, summary[str(beams)])
    out = {"machine": machine_info(), "new_tokens": args.new_tokens, "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
