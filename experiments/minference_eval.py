"""MInference sparse prefill on SmolLM2-135M-Instruct against dense (flash) prefill, side by side in one run.

  (a) passkey retrieval at several lengths up to the 8k context and several depths (the haystack, needle and
      question of `kv_compression_eval.py`): greedy answer after the prefill, correct if its first number is
      the key; and RULER-style multi-key needle and variable tracking (`long_context_tasks.py`). Decoding is
      the same for every config (a dense cache); only the prefill differs.
  (b) perplexity, KL(dense || sparse) and top-1 agreement over the last `--ppl-last` positions of a long real
      document (Python's language reference from half way in), scored from the prefill itself: those positions
      attend to the whole document through the sparse pattern.
  (c) prefill seconds at `--speed-lengths` (batch 1, compiled, median of `--repeats`, configs interleaved).
Configs: "full" (dense flash prefill), "minference" (SmolLM2's fitted patterns, shipped with ssm_llm), the same
at twice the budget, "vertical_slash" (every head vertical-slash, the paper's default without fitting),
"vertical_slash_dense0" (the same with layer 0 dense), and the same budget spent otherwise: "vertical_slash_q128"
(indices estimated from the last 128 queries) and "vertical_slash_6x384" (6 slash blocks + 384 columns).
Writes experiments/results/minference_eval.json (+ .png) and prints a table.

    python experiments/minference_eval.py            # ~25 min on 2 cores
    python experiments/minference_eval.py --quick    # ~2 min smoke run, writes minference_eval_quick.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import long_context_tasks as tasks  # noqa: E402
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


def configs(model: str, patterns_file: Path | None = None) -> dict:
    fitted = MInference.fitted(model)
    extra = {} if patterns_file is None else {"patterns_file": MInference.load(patterns_file)}
    return {
        "full": None,
        **extra,
        "minference": fitted,
        "minference_2x": MInference.fitted(model, blocks=2 * fitted.blocks, columns=2 * fitted.columns),
        "vertical_slash": MInference(block=fitted.block, blocks=fitted.blocks, columns=fitted.columns),
        # Layer 0 recalls the least under every pattern (0.58 of its attention weight on the fitting sample).
        "vertical_slash_dense0": MInference(
            block=fitted.block, blocks=fitted.blocks, columns=fitted.columns, dense_layers=(0,)
        ),
        # The same number of keys per query block, spent otherwise: estimated from twice the last queries, or
        # with fewer slash blocks and more vertical columns.
        "vertical_slash_q128": MInference(
            block=fitted.block, blocks=fitted.blocks, columns=fitted.columns, last_queries=128
        ),
        "vertical_slash_6x384": MInference(block=fitted.block, blocks=6, columns=384),
    }


def budget(sparse) -> str:
    if sparse is None:
        return "dense causal"
    patterns = "fitted patterns" if sparse.patterns else "every head vertical-slash"
    dense = f", layers {list(sparse.dense_layers)} dense" if sparse.dense_layers else ""
    return f"{patterns}: {sparse.blocks} blocks of {sparse.block} + {sparse.columns} columns per query block{dense}"


def prompt_hidden(params, config, tokens, sparse):
    """The final-normed hidden states [B, T, H] of one (dense or sparse) prefill of unpadded `tokens`."""
    cache = ssm_llm.init_cache(config, tokens.shape[0], tokens.shape[1])
    counts = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    extra = {} if sparse is None else {"sparse_prefill": sparse}
    return attention_lm.hidden_states(params, config, tokens, cache, counts, cache_is_empty=True, **extra)[0]


@functools.partial(jax.jit, static_argnames=("config", "sparse", "last"))
def prompt_logprobs(params, config, tokens, sparse, last: int):
    """Log-probs [B, last, V] of the next token at the prompt's last `last` positions (one prefill)."""
    h = prompt_hidden(params, config, tokens, sparse)
    return jax.nn.log_softmax(logits_from_hidden(params, config, h[:, -last:]).astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "sparse"))
def prefill_last_logits(params, config, tokens, sparse):
    return logits_from_hidden(params, config, prompt_hidden(params, config, tokens, sparse)[:, -1])


def task_prompts(task: str, tokenizer, hay, hay_text, length: int, args, rng):
    """(prompts, what each answer must hold, scorer, answer tokens) of one task at one length."""
    if task == "passkey":
        keys = [int(k) for k in rng.integers(10_000, 100_000, len(args.depths))]
        prompts = [
            passkey_prompt(tokenizer, hay, hay_text, length, d, k) for d, k in zip(args.depths, keys, strict=True)
        ]
        return prompts, keys, tasks.multikey_score, args.answer_tokens
    build, score, answer = tasks.TASKS[task]
    built = [build(tokenizer, hay, length, rng) for _ in range(args.samples)]
    return [p for p, _ in built], [e for _, e in built], score, answer


def run_tasks(params, config, tokenizer, cfgs, args, rng):
    """Every task at every length: one batch of prompts, each config's greedy answers and scores."""
    hay = text_ids(tokenizer, max(args.lengths), start=0.0)
    hay_text = tokenizer.batch_decode([[t] for t in hay])
    out = {}
    for task in args.tasks:
        rows = out[task] = {}
        for length in tqdm(args.lengths, desc=task):
            prompts, expected, score, answer_tokens = task_prompts(task, tokenizer, hay, hay_text, length, args, rng)
            row = rows[length] = {"expected": expected, "configs": {}}
            for name, sparse in tqdm(cfgs.items(), desc=f"{length} tokens", leave=False):
                gen = ssm_llm.GenerationConfig(max_new_tokens=answer_tokens, eos_token_ids=(), sparse_prefill=sparse)
                texts = tokenizer.batch_decode(ssm_llm.generate(params, config, prompts, gen).tokens)
                scores = [score(t, e) for t, e in zip(texts, expected, strict=True)]
                row["configs"][name] = {"answers": texts, "scores": scores, "score": float(np.sum(scores))}
    return out


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
    x = np.arange(len(names))
    panels = [("speed", None)] * bool(summary["speed"]) + [("task", t) for t in summary["tasks"]]
    panels += [("perplexity", None)] * bool(summary["perplexity"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4), squeeze=False)
    for ax, (kind, task) in zip(axes[0], panels, strict=True):
        if kind == "speed":
            for i, length in enumerate(summary["speed"]):
                secs = [summary["speed"][length][n]["seconds"] for n in names]
                ax.bar(x + 0.4 * i, secs, width=0.4, label=f"{length} tokens")
            ax.set_title("prefill seconds (batch 1)")
        elif kind == "task":
            rows = summary["tasks"][task]
            for i, (length, row) in enumerate(rows.items()):
                scores = [row["configs"][n]["score"] / len(row["expected"]) for n in names]
                ax.bar(x + 0.8 * i / len(rows), scores, width=0.8 / len(rows), label=f"{length} tokens")
            ax.set_title(f"{task}: score by prompt length")
        else:
            ax.bar(x, [summary["perplexity"]["configs"][n]["perplexity"] for n in names])
            p = summary["perplexity"]
            ax.set_title(f"perplexity, last {p['scored_last']} of {p['length']}")
        if kind != "perplexity":
            ax.legend(fontsize=8)
        ax.set_xticks(x, names, rotation=20, fontsize=8)
    fig.suptitle(f"MInference sparse prefill, {model}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8160])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens of a passkey answer")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["passkey", "multikey", "variables"],
        choices=["passkey", "multikey", "variables"],
        help="passkey (one prompt per depth), RULER-style multi-key needle and variable tracking "
        "(experiments/long_context_tasks.py, --samples prompts each)",
    )
    parser.add_argument("--samples", type=int, default=3, help="prompts per length of multikey / variables")
    parser.add_argument("--no-perplexity", action="store_true", help="skip (b)")
    parser.add_argument("--ppl-length", type=int, default=8192)
    parser.add_argument("--ppl-last", type=int, default=1024)
    parser.add_argument("--speed-lengths", nargs="*", type=int, default=[4096, 8192], help="none: skip (c)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=None, help="a subset of the configs (full is always run)")
    parser.add_argument(
        "--patterns", type=Path, default=None, help="also run the patterns saved in this JSON (config patterns_file)"
    )
    parser.add_argument("--quick", action="store_true", help="short prompts, 2 depths: checks the script works")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.depths, args.ppl_length, args.ppl_last = [1024], [0.3, 0.7], 1024, 128
        args.speed_lengths, args.repeats, args.samples = [1024], 1, 1
    out = args.out or RESULTS / ("minference_eval_quick.json" if args.quick else "minference_eval.json")
    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    tokenizer = converters.load_tokenizer(path)
    cfgs = configs("SmolLM2-135M-Instruct", args.patterns)
    if args.configs:
        cfgs = {n: s for n, s in cfgs.items() if n == "full" or n in args.configs}
    start = time.perf_counter()
    speed = run_speed(params, config, tokenizer, cfgs, args)
    task_rows = run_tasks(params, config, tokenizer, cfgs, args, np.random.default_rng(0))
    perplexity = None if args.no_perplexity else run_perplexity(params, config, tokenizer, cfgs, args)
    summary = {
        "model": path.name,
        "machine": machine_info(),
        "minutes": (time.perf_counter() - start) / 60,
        "configs": {n: budget(s) for n, s in cfgs.items()},
        "speed": speed,
        "tasks": task_rows,
        "perplexity": perplexity,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"), path.name)
    print(f"\n{out} ({summary['minutes']:.1f} min)")
    header = ["config", *(f"prefill {n}" for n in speed)]
    header += [f"{task} {n}" for task, rows in task_rows.items() for n in rows]
    header += ["perplexity", "KL"] if perplexity else []
    print(" | ".join(header))
    for name in cfgs:
        cells = [name]
        cells += [f"{speed[n][name]['seconds']:.1f} s ({speed[n][name]['speedup_vs_full']:.2f}x)" for n in speed]
        for rows in task_rows.values():
            cells += [f"{r['configs'][name]['score']:g}/{len(r['expected'])}" for r in rows.values()]
        if perplexity:
            ppl = perplexity["configs"][name]
            cells += [f"{ppl['perplexity']:.2f}", f"{ppl.get('kl', 0.0):.4f}"]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
