"""Token-level cascades on SmolLM2-135M-Instruct: the cost-quality curve over the deferral threshold.

Large model: SmolLM2-135M (30 layers, float32). Small model: the same network cut after its first --exit-layer
layers (early exit, untrained: the final norm and the tied head read layer k's hidden state), so both share the
vocabulary and the small one costs about k/30 of a large forward. The paper's small models are trained ones;
this pair is what the machine offers without a download (a trained small model over SmolLM2's vocabulary can
replace it: --small CHECKPOINT).

For each Chow threshold (uncertainty 1 - max probability; 0 defers every token), `cascade.generate` runs the
--prompts chat prompts as one batch, greedy, --new-tokens tokens, and we record: the deferral rate and the large
model's forwards; agreement with the large model (the share of the cascade's tokens equal to the large model's
argmax on the cascade's own text, teacher-forced, and the share of prompts whose whole output equals the large
model's greedy output); the large model's mean negative log-likelihood of the cascade's text; wall time beside
the small and the large model alone (`ssm_llm.generate`, the same batch; second calls, compiled). One run writes
experiments/results/cascade_eval.{json,png} with the CPU model and its flags.

    .venv/bin/python experiments/cascade_eval.py [--exit-layer 20] [--prompts 16] [--new-tokens 48] [--quick]
    .venv/bin/python experiments/cascade_eval.py --batch-size 1 --prompts 8 --thresholds 0,0.2,0.4,0.6,1.01 \\
        --out experiments/results/cascade_eval_batch1.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_runners import machine_info

import converters
import ssm_llm
from ssm_llm import cascade

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What are the three primary colors?",
    "How do I reverse a list in Python?",
    "Name a famous painting by Leonardo da Vinci.",
    "Why is the sky blue?",
    "Give me a tip for sleeping better.",
    "What is 12 times 12?",
    "Describe a cat in two sentences.",
    "What does a compiler do?",
    "Suggest a name for a bakery.",
    "What is the boiling point of water at sea level?",
    "How many continents are there?",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
]
THRESHOLDS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]


def early_exit(params: dict, config, layers: int):
    """The model cut after its first `layers` layers (stacked layout), its final norm and head kept."""
    cut = dict(params, layers=jax.tree.map(lambda x: x[:layers], params["layers"]))
    return cut, dataclasses.replace(config, num_layers=layers, layer_windows=config.layer_windows[:layers])


def teacher_forced(params, config, prompts, outputs):
    """Per sequence: (the large model's argmax before each output token [n], the NLL of each output token [n])."""
    rows = [p + o for p, o in zip(prompts, outputs, strict=True)]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    counts = jnp.asarray([len(r) for r in rows], jnp.int32)
    logits, _ = ssm_llm.forward(
        params, config, jnp.asarray(tokens), ssm_llm.init_cache(config, len(rows), width), token_counts=counts
    )
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    out = []
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        before = logp[i, len(p) - 1 : len(p) - 1 + len(o)]
        out.append((before.argmax(-1), -before[np.arange(len(o)), o]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exit-layer", type=int, default=20, help="the small model: SmolLM2's first k layers")
    parser.add_argument("--small", help="a small model checkpoint over SmolLM2's vocabulary instead of the early exit")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="prompts per call (default: all in one batch); 1: one at a time"
    )
    parser.add_argument("--thresholds", help="comma-separated Chow thresholds (default: 0 to 0.9 and 1.01)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 12 tokens, 4 thresholds (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cascade_eval.json"))
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else THRESHOLDS
    if args.quick:
        args.prompts, args.new_tokens, thresholds = 4, 12, [0.0, 0.3, 0.7, 1.01]

    path = ssm_llm.default_model_path()
    tokenizer = converters.load_tokenizer(path)
    large = converters.load(path)[::-1]  # (params, config)
    small = converters.load(args.small)[::-1] if args.small else early_exit(*large, args.exit_layer)
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        ).input_ids
        for q in QUESTIONS[: args.prompts]
    ]
    eos = tuple(sorted(set(large[1].eos_token_ids) | {tokenizer.eos_token_id} - {None}))
    gen = ssm_llm.GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=eos)
    size = args.batch_size or len(prompts)
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]

    def alone(model):
        tokens, seconds = [], 0.0
        for batch in batches:
            ssm_llm.generate(*model, batch, gen)
            out = ssm_llm.generate(*model, batch, gen)
            tokens, seconds = tokens + out.tokens, seconds + out.prefill_seconds + out.decode_seconds
        return tokens, seconds

    def cascaded(rule):
        """The batches' results merged: (tokens, deferred flags, large forwards, seconds)."""
        tokens, deferred, forwards, seconds = [], [], 0, 0.0
        for batch in batches:
            cascade.generate(small, large, batch, rule, max_new_tokens=args.new_tokens, eos_token_ids=eos)  # compile
            out = cascade.generate(small, large, batch, rule, max_new_tokens=args.new_tokens, eos_token_ids=eos)
            tokens, deferred = tokens + out.tokens, deferred + out.deferred
            forwards, seconds = forwards + out.large_forwards, seconds + out.seconds
        return tokens, deferred, forwards, seconds

    large_tokens, large_s = alone(large)
    small_tokens, small_s = alone(small)
    print(f"alone: large {large_s:.2f} s, small {small_s:.2f} s", flush=True)
    reference_nll = np.mean(np.concatenate([nll for _, nll in teacher_forced(*large, prompts, large_tokens)]))

    rows = []
    for threshold in thresholds:
        tokens, deferred, forwards, seconds = cascaded(cascade.TokenCascade(threshold, "chow"))
        judged = teacher_forced(*large, prompts, tokens)
        agree = np.concatenate([best == np.asarray(o) for (best, _), o in zip(judged, tokens, strict=True)])
        written = sum(map(len, deferred))
        row = {
            "threshold": threshold,
            "deferral_rate": sum(map(sum, deferred)) / written if written else 0.0,
            "large_forwards": forwards,
            "token_agreement": float(agree.mean()) if agree.size else 1.0,
            "same_output_as_large": sum(t == r for t, r in zip(tokens, large_tokens, strict=True)) / len(prompts),
            "large_nll": float(np.mean(np.concatenate([nll for _, nll in judged]))),
            "seconds": seconds,
            "tokens": sum(map(len, tokens)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "machine": machine_info(),
        "small": args.small or f"SmolLM2-135M early exit after layer {args.exit_layer} of 30",
        "prompts": len(prompts),
        "batch_size": size,
        "new_tokens": args.new_tokens,
        "alone_seconds": {"large": large_s, "small": small_s},
        "large_greedy_nll": float(reference_nll),
        "small_alone_same_output_as_large": sum(t == r for t, r in zip(small_tokens, large_tokens, strict=True))
        / len(prompts),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = [r["deferral_rate"] for r in rows]
    a.plot(x, [r["token_agreement"] for r in rows], "o-", label="token agreement (teacher-forced)")
    a.plot(x, [r["same_output_as_large"] for r in rows], "s--", label="whole output = large's")
    a.set_xlabel("deferral rate")
    a.set_ylabel("agreement with the large model")
    a.legend(fontsize=7)
    b.plot(x, [r["seconds"] for r in rows], "o-", label="cascade")
    b.axhline(large_s, color="k", ls="--", label="large alone")
    b.axhline(small_s, color="g", ls=":", label="small alone")
    b.set_xlabel("deferral rate")
    b.set_ylabel(f"seconds ({len(batches)} call(s) of {size} prompts)")
    b.legend(fontsize=7)
    fig.suptitle(f"Token-level cascade: {result['small']} -> SmolLM2-135M", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
