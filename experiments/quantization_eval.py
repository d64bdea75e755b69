"""What `ssm_llm.quantize_weights` costs in accuracy on the real model (SmolLM2-135M-Instruct): held-out
perplexity, KL divergence to float32, next-token and greedy agreement, and weight bytes, per scheme.

Model: the embedded SmolLM2 GGUF (`ssm_llm.default_model_path()`), converted to float32 — which is the
reference ("fp32") every row is compared with. Note that the file ships as Q4_1, so fp32 is the
dequantized Q4_1 model: its weights already sit on a 4-bit grid of 32-row groups.
Data (`text_corpus`, the Python reference + Vim manuals, no download): evaluation on --eval-windows
windows of --seq-len tokens spread over the held-out EVAL split (>= 32k scored tokens by default);
calibration (smoothing, GPTQ) on --calib-seqs windows of --calib-len tokens from the TRAIN split (seed 0).
Greedy agreement: --prompts prompts of --prompt-len held-out tokens, --new-tokens greedy tokens each
(`ssm_llm.generate`, one batch, no EOS stop), compared with fp32's: "greedy_same_tokens" is the share
of positions holding the same token, "greedy_prefix" the mean share before the first difference.
Where a row first parts from fp32's greedy text, "divergence_margins" holds fp32's own margin there (its
top-1 minus top-2 logit, from one forward over the prompt + fp32's tokens) and "divergence_ranks" the rank
of the row's token among fp32's candidates (1 = fp32's runner-up): free-running agreement is decided at
near-ties, and "fp32_margin_quantiles" (10/50/90%, over every generated position) say how near these are.

Rows (`quantize_weights` arguments; --rows picks some, fnmatch patterns):
  fp32                     the float model
  w8a8                     int8 weights per output channel, dynamic per-token int8 activations
  w8a8 smooth=A            + SmoothQuant outlier migration with alpha A (--alphas)
  w8a8 smooth=A gptq       + GPTQ weights
  w8a8 (smooth=A) rot (gptq)  + online block-Hadamard rotation of every linear's input (QuaRot-style)
  ... emb                  + the embedding / tied output projection int8 per vocabulary row (W8A8 logits)
  ... emb res              + its rounding residual in 4 bits, each row's top logits refined against it (the
                           CLI's default, "w8a8-rot-emb")
  w8a16 / w8a16 gptq       int8 weights only
  w4a16 gG / w4a16 gG gptq int4 weights in groups of G rows (--group-size), re-quantized from fp32
  w4a16 gguf codes         `converters.load(path, quantize="w4a16")`: the file's own Q4_1 codes
Targets (issue 20): W8A8 perplexity within 1% of fp32, greedy agreement >= 90% of tokens.
Writes experiments/results/quantization_eval.json (+ .png) and prints a table.

    python experiments/quantization_eval.py                        # every row, ~25 min on 2 cores
    python experiments/quantization_eval.py --rows fp32 'w8a8*' --eval-windows 8
    python experiments/quantization_eval.py --quick                # small sizes: quantization_eval_quick.json
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import text_corpus  # noqa: E402
from bench_runners import machine_info, tree_bytes  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402
from ssm_llm.models.attention_lm import LINEARS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0
TARGET_PPL = 0.01
TARGET_GREEDY = 0.90
SIZES = {
    "full": {"eval_windows": 64, "seq_len": 512, "calib_seqs": 16, "calib_len": 512, "prompts": 20, "new_tokens": 64},
    "quick": {"eval_windows": 4, "seq_len": 128, "calib_seqs": 2, "calib_len": 128, "prompts": 4, "new_tokens": 16},
}


def rows_for(alphas: list[float], group_size: int) -> dict[str, dict | None]:
    """Row name -> `quantize_weights` keyword arguments (None: the float model)."""
    rows: dict[str, dict | None] = {"fp32": None, "w8a8": {"scheme": "w8a8"}}
    for a in alphas:
        rows[f"w8a8 smooth={a:g}"] = {"scheme": "w8a8", "smoothing": a}
    for a in alphas:
        rows[f"w8a8 smooth={a:g} gptq"] = {"scheme": "w8a8", "smoothing": a, "gptq": True}
    rows["w8a8 rot"] = {"scheme": "w8a8", "rotation": True}
    for a in alphas:
        rows[f"w8a8 smooth={a:g} rot"] = {"scheme": "w8a8", "smoothing": a, "rotation": True}
        rows[f"w8a8 smooth={a:g} rot gptq"] = {"scheme": "w8a8", "smoothing": a, "rotation": True, "gptq": True}
    rows["w8a8 rot emb"] = {"scheme": "w8a8", "rotation": True, "embedding": True}
    rows["w8a8 rot emb res"] = {"scheme": "w8a8", "rotation": True, "embedding": True, "head_residual": True}
    for a in alphas:
        rows[f"w8a8 smooth={a:g} rot gptq emb"] = {
            "scheme": "w8a8",
            "smoothing": a,
            "rotation": True,
            "gptq": True,
            "embedding": True,
        }
    rows["w8a16"] = {"scheme": "w8a16"}
    rows["w8a16 gptq"] = {"scheme": "w8a16", "gptq": True}
    rows[f"w4a16 g{group_size}"] = {"scheme": "w4a16", "group_size": group_size}
    rows[f"w4a16 g{group_size} gptq"] = {"scheme": "w4a16", "group_size": group_size, "gptq": True}
    rows["w4a16 gguf codes"] = {"load": "w4a16"}  # converters.load keeps the file's Q4_1 blocks
    return rows


@functools.partial(jax.jit, static_argnames="config")
def _log_probs(params, config, tokens):
    """Next-token log-probabilities [B, T, V] (float32) of `tokens` [B, T] from an empty cache."""
    logits, _ = ssm_llm.forward(params, config, tokens, ssm_llm.init_cache(config, *tokens.shape))
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit
def _compare(lq, lr, targets):
    """Summed NLL of `targets` under lq, summed KL(lr || lq), and the count of equal argmaxes."""
    nll = -jnp.take_along_axis(lq, targets[..., None], axis=-1)[..., 0].sum()
    kl = (jnp.exp(lr) * (lr - lq)).sum()
    return nll, kl, (jnp.argmax(lq, -1) == jnp.argmax(lr, -1)).sum()


class Reference:
    """The float model's log-probabilities per evaluation batch, computed once and kept on disk (each
    batch is [B, T, V] float32: ~400 MB at 4 x 512 x 49152), so every row runs one forward, not two."""

    def __init__(self, params, config, directory: Path):
        self.params, self.config, self.directory = params, config, directory
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int, tokens) -> np.ndarray:
        path = self.directory / f"batch{index}.npy"
        if not path.exists():
            np.save(path, np.asarray(_log_probs(self.params, self.config, tokens)))
        return np.load(path, mmap_mode="r")


def scores(params, config, reference: Reference, windows: np.ndarray, batch: int) -> dict:
    """Mean NLL, mean KL to the reference and next-token agreement over every target of `windows`."""
    sums = np.zeros(3)
    for i, start in enumerate(tqdm(range(0, len(windows), batch), desc="scoring", leave=False)):
        chunk = jnp.asarray(windows[start : start + batch])
        tokens, targets = chunk[:, :-1], chunk[:, 1:]
        lr = reference(i, tokens)
        lq = lr if params is reference.params else _log_probs(params, config, tokens)
        sums += [float(v) for v in _compare(jnp.asarray(lq), jnp.asarray(lr), targets)]
    n = windows.shape[0] * (windows.shape[1] - 1)
    nll, kl, same = sums / n
    return {"nll": nll, "perplexity": float(np.exp(nll)), "kl_to_fp32": kl, "next_token_agreement": same}


def greedy(params, config, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    gen = ssm_llm.GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
    return ssm_llm.generate(params, config, prompts, gen).tokens


def agreement(tokens: list[list[int]], ref: list[list[int]], ref_logits: np.ndarray) -> dict:
    """Greedy agreement with fp32's tokens `ref`; at each first difference, fp32's margin (top-1 - top-2 of
    `ref_logits` [P, new_tokens, V], fp32's logits where it chose each of its tokens) and the row's token's
    rank among fp32's candidates (1 = fp32's runner-up; 0 only where the forward and the decode loop, two
    compiled programs, break an exact near-tie differently)."""
    same = np.mean([np.mean(np.equal(a, b)) for a, b in zip(tokens, ref, strict=True)])
    prefix, margins, ranks = [], [], []
    for p, (a, b) in enumerate(zip(tokens, ref, strict=True)):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        prefix.append(k / len(a))
        if k < len(a):
            top2 = np.sort(ref_logits[p, k])[-2:]
            margins.append(float(top2[1] - top2[0]))
            ranks.append(int((ref_logits[p, k] > ref_logits[p, k, a[k]]).sum()))
    return {
        "greedy_same_tokens": float(same),
        "greedy_prefix": float(np.mean(prefix)),
        "divergence_margins": margins,
        "divergence_ranks": ranks,
    }


def greedy_logits(params, config, prompts: list[list[int]], tokens: list[list[int]]) -> np.ndarray:
    """The model's logits [P, new_tokens, V] at the positions where `tokens` (its greedy continuation of the
    equal-length `prompts`) were chosen: one forward over prompt + tokens."""
    seqs = jnp.asarray([p + t for p, t in zip(prompts, tokens, strict=True)])
    start = len(prompts[0]) - 1
    out = []
    for row in range(seqs.shape[0]):  # one row at a time: [T, V] float32 is ~25 MB
        logits, _ = ssm_llm.forward(params, config, seqs[row : row + 1], ssm_llm.init_cache(config, 1, seqs.shape[1]))
        out.append(np.asarray(logits[0, start : start + len(tokens[0])], np.float32))
    return np.stack(out)


def load_data(args, tokenizer) -> dict:
    corpus = text_corpus.load_corpus(text_corpus.SOURCES, max_chars=args.max_chars, tokenizer=tokenizer)
    train, held_out = corpus.split_tokens("train"), corpus.split_tokens("eval")
    rng = np.random.default_rng(SEED)
    calibration = next(text_corpus.batches(train, args.calib_seqs, args.calib_len, rng))[:, :-1]
    windows = text_corpus.eval_windows(held_out, args.seq_len, args.eval_windows)
    starts = np.linspace(0, len(held_out) - args.prompt_len - 1, args.prompts).round().astype(np.int64)
    prompts = [held_out[s : s + args.prompt_len].tolist() for s in starts]
    return {"calibration": calibration, "windows": windows, "prompts": prompts, "eval_tokens": len(held_out)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=None, help="fnmatch patterns of row names (default: all)")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.8])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small sizes; writes quantization_eval_quick.json")
    for name, value in SIZES["full"].items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=None, help="only the corpus's first characters")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = RESULTS / ("quantization_eval_quick.json" if args.quick else "quantization_eval.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    tokenizer = converters.load_tokenizer(path)
    data = load_data(args, tokenizer)
    rows = rows_for(args.alphas, args.group_size)
    chosen = [n for n in rows if n == "fp32" or not args.rows or any(fnmatch.fnmatch(n, p) for p in args.rows)]
    ref_tokens = greedy(params, config, data["prompts"], args.new_tokens)
    ref_logits = greedy_logits(params, config, data["prompts"], ref_tokens)
    # The forward retraces fp32's greedy choices except, possibly, at exact near-ties (two compiled programs).
    retraced = float((ref_logits.argmax(-1) == np.asarray(ref_tokens)).mean())
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    fp32_margins = (top2[..., 1] - top2[..., 0]).reshape(-1)
    margin_quantiles = {f"{q:.0%}": float(np.quantile(fp32_margins, q)) for q in (0.1, 0.5, 0.9)}
    scratch = tempfile.TemporaryDirectory(prefix="quantization_eval_")
    reference = Reference(params, config, Path(scratch.name))
    results = {}
    for name in tqdm(chosen, desc="rows"):
        kwargs = rows[name]
        start = time.perf_counter()
        if kwargs is None:
            qparams, qconfig = params, config
        elif "load" in kwargs:
            qconfig, qparams = converters.load(path, quantize=kwargs["load"])
        else:
            extra = (
                {"calibration": data["calibration"], "progress": False}
                if "gptq" in kwargs or "smoothing" in kwargs
                else {}
            )
            qparams, qconfig = ssm_llm.quantize_weights(params, config, **kwargs, **extra)
        quantize_s = time.perf_counter() - start
        row = scores(qparams, qconfig, reference, data["windows"], args.eval_batch)
        row.update(agreement(greedy(qparams, qconfig, data["prompts"], args.new_tokens), ref_tokens, ref_logits))
        linears = tree_bytes([qparams["layers"][n] for n in LINEARS])
        row.update(
            weight_bytes=tree_bytes(qparams), linear_bytes=linears, quantize_seconds=quantize_s, arguments=kwargs
        )
        results[name] = row
        print(
            f"{name:<24} ppl {row['perplexity']:.3f}  kl {row['kl_to_fp32']:.4f}  "
            f"greedy {row['greedy_same_tokens']:.3f}"
        )
    scratch.cleanup()
    base = results["fp32"]
    for row in results.values():
        row["ppl_ratio"] = row["perplexity"] / base["perplexity"]
        row["bytes_ratio"] = row["weight_bytes"] / base["weight_bytes"]
        row["linear_bytes_ratio"] = row["linear_bytes"] / base["linear_bytes"]
    result = {
        "model": f"{path.name} (dequantized to float32)",
        "machine": machine_info(),
        "setup": {
            "evaluation": {
                "windows": len(data["windows"]),
                "tokens_per_window": args.seq_len,
                "scored_tokens": int(len(data["windows"]) * args.seq_len),
                "held_out_tokens": data["eval_tokens"],
            },
            "calibration": {"windows": args.calib_seqs, "tokens_per_window": args.calib_len},
            "greedy": {"prompts": args.prompts, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens},
            "fp32_margin_quantiles": margin_quantiles,
            "fp32_forward_retraces_greedy": retraced,
        },
        "targets": {"w8a8_ppl_within": TARGET_PPL, "greedy_same_tokens_at_least": TARGET_GREEDY},
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print_table(result, args.out)
    return result


def plot(result: dict, path: Path) -> None:
    """Perplexity ratio and greedy agreement per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    rows = [result["rows"][n] for n in names]
    ys = np.arange(len(names))[::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.5), sharey=True)
    colors = ["gray" if n == "fp32" else "tab:blue" if "a8" in n.split()[0][2:] else "tab:orange" for n in names]
    ax1.barh(ys, [r["ppl_ratio"] - 1 for r in rows], color=colors)
    ax1.axvline(TARGET_PPL, color="black", linestyle="--", linewidth=1, label="W8A8 target +1%")
    ax1.set_xlabel("perplexity / fp32's - 1")
    ax1.legend(fontsize=7)
    ax2.barh(ys, [r["greedy_same_tokens"] for r in rows], color=colors)
    ax2.axvline(TARGET_GREEDY, color="black", linestyle="--", linewidth=1, label="target 90%")
    ax2.set_xlabel("greedy tokens equal to fp32's")
    ax2.legend(fontsize=7)
    ax1.set_yticks(ys, names, fontsize=7)
    machine = result["machine"]
    fig.suptitle(
        f"SmolLM2-135M quantized, {result['setup']['evaluation']['scored_tokens']} held-out tokens ({machine['cpu']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict, path: Path) -> None:
    print(f"\nresults: {path}; {result['machine']['cpu']}")
    print(f"fp32's top-1 - top-2 logit margin over its greedy tokens: {result['setup']['fp32_margin_quantiles']}")
    print(
        f"{'row':<24}{'ppl':>9}{'ratio':>8}{'KL':>8}{'top1':>7}{'greedy':>8}{'prefix':>8}{'MB':>8}{'linears':>9}"
        "  fp32 margin at divergences"
    )
    for name, r in result["rows"].items():
        margins = r.get("divergence_margins", [])
        print(
            f"{name:<24}{r['perplexity']:>9.3f}{r['ppl_ratio']:>8.4f}{r['kl_to_fp32']:>8.4f}"
            f"{r['next_token_agreement']:>7.3f}{r['greedy_same_tokens']:>8.3f}{r['greedy_prefix']:>8.3f}"
            f"{r['weight_bytes'] / 1e6:>8.1f}{r['linear_bytes_ratio']:>9.3f}"
            f"  {len(margins)} parted, median {np.median(margins) if margins else float('nan'):.3f}"
        )


if __name__ == "__main__":
    main()
