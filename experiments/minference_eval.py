"""MInference sparse prefill on SmolLM2-135M-Instruct against dense (flash) prefill, side by side in one run.

  (a) passkey retrieval at several lengths up to the 8k context and several depths (the haystack, needle and
      question of `kv_compression_eval.py`): greedy answer after the prefill, correct if its first number is
      the key. Decoding is the same for every config (a dense cache); only the prefill differs.
  (b) perplexity, KL(dense || sparse) and top-1 agreement over the last `--ppl-last` positions of a long real
      document (Python's language reference from half way in), scored from the prefill itself: those positions
      attend to the whole document through the sparse pattern.
  (c) prefill seconds at `--speed-lengths` (batch 1, compiled, median of `--repeats`, configs interleaved).
Configs: "full" (dense flash prefill), "minference" (SmolLM2's fitted patterns, shipped with ssm_llm), the same
at twice the budget, "vertical_slash" (every head vertical-slash, the paper's default without fitting) and
"vertical_slash_dense0" (the same with layer 0 dense).
Writes experiments/results/minference_eval.json (+ .png) and prints a table.

    python experiments/minference_eval.py            # ~25 min on 2 cores
    python experiments/minference_eval.py --quick    # ~2 min smoke run, writes minference_eval_quick.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_runners import machine_info  # noqa: E402
from kv_compression_eval import continuation_metrics, passkey_prompt, text_ids  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402
from ssm_llm.kv import MInference  # noqa: E402
from ssm_llm.models import attention_lm  # noqa: E402
from ssm_llm.models.lm_head import logits_from_hidden  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def configs(model: str) -> dict:
    fitted = MInference.fitted(model)
    return {
        "full": None,
        "minference": fitted,
        "minference_2x": MInference.fitted(model, blocks=2 * fitted.blocks, columns=2 * fitted.columns),
        "vertical_slash": MInference(block=fitted.block, blocks=fitted.blocks, columns=fitted.columns),
        # Layer 0 recalls the least under every pattern (0.58 of its attention weight on the fitting sample).
        "vertical_slash_dense0": MInference(
            block=fitted.block, blocks=fitted.blocks, columns=fitted.columns, dense_layers=(0,)
        ),
    }


def budget(sparse) -> str:
    if sparse is None:
        return "dense causal"
    patterns = "fitted patterns" if sparse.patterns else "every head vertical-slash"
    dense = f", layers {list(sparse.dense_layers)} dense" if sparse.dense_layers else ""
    return f"{patterns}: {sparse.blocks} blocks of {sparse.block} + {sparse.columns} columns per query block{dense}"


@functools.partial(jax.jit, static_argnames=("config", "sparse", "last"))
def prompt_logprobs(params, config, tokens, sparse, last: int):
    """Log-probs [B, last, V] of the next token at the prompt's last `last` positions (one prefill)."""
    cache = ssm_llm.init_cache(config, tokens.shape[0], tokens.shape[1])
    counts = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    extra = {} if sparse is None else {"sparse_prefill": sparse}
    h, _ = attention_lm.hidden_states(params, config, tokens, cache, counts, cache_is_empty=True, **extra)
    return jax.nn.log_softmax(logits_from_hidden(params, config, h[:, -last:]).astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "sparse"))
def prefill_last_logits(params, config, tokens, sparse):
    cache = ssm_llm.init_cache(config, tokens.shape[0], tokens.shape[1])
    counts = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    extra = {} if sparse is None else {"sparse_prefill": sparse}
    h, _ = attention_lm.hidden_states(params, config, tokens, cache, counts, cache_is_empty=True, **extra)
    return logits_from_hidden(params, config, h[:, -1])


def run_passkey(params, config, tokenizer, cfgs, args, rng):
    hay = text_ids(tokenizer, max(args.lengths), start=0.0)
    hay_text = tokenizer.batch_decode([[t] for t in hay])
    rows = {}
    for length in tqdm(args.lengths, desc="passkey lengths"):
        keys = [int(k) for k in rng.integers(10_000, 100_000, len(args.depths))]
        prompts = [
            passkey_prompt(tokenizer, hay, hay_text, length, d, k) for d, k in zip(args.depths, keys, strict=True)
        ]
        row = {"keys": keys, "configs": {}}
        for name, sparse in tqdm(cfgs.items(), desc=f"{length} tokens", leave=False):
            gen = ssm_llm.GenerationConfig(max_new_tokens=args.answer_tokens, eos_token_ids=(), sparse_prefill=sparse)
            texts = tokenizer.batch_decode(ssm_llm.generate(params, config, prompts, gen).tokens)
            found = [re.search(r"\d+", t) for t in texts]
            correct = [m is not None and m.group() == str(k) for m, k in zip(found, keys, strict=True)]
            row["configs"][name] = {"answers": texts, "correct": correct, "accuracy": float(np.mean(correct))}
        rows[length] = row
    return rows


def run_perplexity(params, config, tokenizer, cfgs, args):
    ids = np.asarray(text_ids(tokenizer, args.ppl_length + 1, start=0.5)[: args.ppl_length + 1])[None]
    tokens, targets = jnp.asarray(ids[:, :-1]), ids[:, -args.ppl_last :]
    out, reference = {}, None
    for name, sparse in tqdm(cfgs.items(), desc="perplexity"):
        logp = np.asarray(prompt_logprobs(params, config, tokens, sparse, args.ppl_last)).transpose(1, 0, 2)
        out[name] = continuation_metrics(logp, targets, reference)
        reference = logp if reference is None else reference
    return {"length": args.ppl_length, "scored_last": args.ppl_last, "configs": out}


def run_speed(params, config, tokenizer, cfgs, args):
    out = {}
    for length in args.speed_lengths:
        tokens = jnp.asarray([text_ids(tokenizer, length, start=0.25)[:length]])
        times = {name: [] for name in cfgs}
        for sparse in cfgs.values():  # compile
            jax.block_until_ready(prefill_last_logits(params, config, tokens, sparse))
        for _ in tqdm(range(args.repeats), desc=f"prefill speed at {length}"):
            for name, sparse in cfgs.items():
                start = time.perf_counter()
                jax.block_until_ready(prefill_last_logits(params, config, tokens, sparse))
                times[name].append(time.perf_counter() - start)
        dense = statistics.median(times["full"])
        out[length] = {
            name: {"seconds": statistics.median(t), "all_seconds": t, "speedup_vs_full": dense / statistics.median(t)}
            for name, t in times.items()
        }
    return out


def plot(summary, path, model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["configs"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for i, length in enumerate(summary["speed"]):
        secs = [summary["speed"][length][n]["seconds"] for n in names]
        axes[0].bar(np.arange(len(names)) + 0.4 * i, secs, width=0.4, label=f"{length} tokens")
    axes[0].set_title("prefill seconds (batch 1)")
    axes[0].legend(fontsize=8)
    for i, length in enumerate(summary["passkey"]):
        acc = [summary["passkey"][length]["configs"][n]["accuracy"] for n in names]
        axes[1].bar(
            np.arange(len(names)) + 0.8 * i / len(summary["passkey"]),
            acc,
            width=0.8 / len(summary["passkey"]),
            label=f"{length}",
        )
    axes[1].set_title("passkey accuracy by prompt length")
    axes[1].legend(fontsize=8)
    ppl = [summary["perplexity"]["configs"][n]["perplexity"] for n in names]
    axes[2].bar(np.arange(len(names)), ppl)
    axes[2].set_title(f"perplexity, last {summary['perplexity']['scored_last']} of {summary['perplexity']['length']}")
    for ax in axes:
        ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    fig.suptitle(f"MInference sparse prefill, {model}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8160])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--ppl-length", type=int, default=8192)
    parser.add_argument("--ppl-last", type=int, default=1024)
    parser.add_argument("--speed-lengths", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=None, help="a subset of the configs (full is always run)")
    parser.add_argument("--quick", action="store_true", help="short prompts, 2 depths: checks the script works")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.depths, args.ppl_length, args.ppl_last = [1024], [0.3, 0.7], 1024, 128
        args.speed_lengths, args.repeats = [1024], 1
    out = args.out or RESULTS / ("minference_eval_quick.json" if args.quick else "minference_eval.json")
    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    tokenizer = converters.load_tokenizer(path)
    cfgs = configs("SmolLM2-135M-Instruct")
    if args.configs:
        cfgs = {n: s for n, s in cfgs.items() if n == "full" or n in args.configs}
    start = time.perf_counter()
    speed = run_speed(params, config, tokenizer, cfgs, args)
    passkey = run_passkey(params, config, tokenizer, cfgs, args, np.random.default_rng(0))
    perplexity = run_perplexity(params, config, tokenizer, cfgs, args)
    summary = {
        "model": path.name,
        "machine": machine_info(),
        "minutes": (time.perf_counter() - start) / 60,
        "configs": {n: budget(s) for n, s in cfgs.items()},
        "speed": speed,
        "passkey": passkey,
        "perplexity": perplexity,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"), path.name)
    print(f"\n{out} ({summary['minutes']:.1f} min)")
    header = ["config", *(f"prefill {n}" for n in speed), *(f"passkey {n}" for n in passkey), "perplexity", "KL"]
    print(" | ".join(header))
    for name in cfgs:
        ppl = perplexity["configs"][name]
        cells = [name]
        cells += [f"{speed[n][name]['seconds']:.1f} s ({speed[n][name]['speedup_vs_full']:.2f}x)" for n in speed]
        cells += [f"{sum(passkey[n]['configs'][name]['correct'])}/{len(args.depths)}" for n in passkey]
        cells += [f"{ppl['perplexity']:.2f}", f"{ppl.get('kl', 0.0):.4f}"]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
