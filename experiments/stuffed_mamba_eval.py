"""Mamba-2 past its training length: per-position perplexity and recall of a planted code at 1x, 4x and 16x the
training length, as trained and with Stuffed Mamba's train-free "forget more, remember less" fix
(`Mamba2Config(state_decay=..., state_input_scale=...)`), each with and without just-read-twice prompts.

The model is the one `experiments/train_mamba2.py` exports (`--model <its --out>/model`; trained on windows of
--train-len tokens of Python's reference and Vim's manuals). The text is the same corpus's held-out documents.

- Perplexity: --windows windows of 16 x train-len tokens of held-out text (evenly spaced over the stream); every
  position's next-token loss, averaged in the buckets [0, T), [T, 4T), [4T, 16T) (T = train-len). A model with
  state collapse gets worse past T; a fix that works keeps the later buckets near the first.
- Recall: " The secret code is NNNNN. " planted at a random depth of held-out text, the whole context L in
  {T, 4T, 16T} tokens, then " What is the secret code? The secret code is"; scored teacher-forced on the code's
  tokens: mean loss, and exact (every token the argmax, i.e. greedy decoding writes the code). "jrt": the
  question, the context, a newline, the context again and the question (`ssm_llm.jrt.read_twice_ids`).

The sequences run through `ssm_llm.forward` in 512-token segments with the cache (one compiled shape per
variant). One run writes experiments/results/stuffed_mamba_eval.{json,png} with the CPU model and its flags.

    .venv/bin/python experiments/stuffed_mamba_eval.py --model ~/.cache/ssm_llm/train/mamba2-small/model
    .venv/bin/python experiments/stuffed_mamba_eval.py --quick   # a random tiny model: plumbing only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import text_corpus
from bench_runners import machine_info
from tqdm.auto import tqdm

import converters
import ssm_llm
from ssm_llm.jrt import read_twice_ids

SEGMENT = 512
# (state_decay, state_input_scale): the model as trained, then memories of about 1000, 200, 100 and 50 tokens
# (1 / (1 - decay)), and one that also writes less into the state.
VARIANTS = [(1.0, 1.0), (0.999, 1.0), (0.995, 1.0), (0.99, 1.0), (0.98, 1.0), (0.995, 0.5)]


def _name(decay: float, scale: float) -> str:
    return (
        "as trained" if (decay, scale) == (1.0, 1.0) else f"decay {decay:g}" + (f", B x{scale:g}" if scale != 1 else "")
    )


def _forward_segments(params, config, tokens: np.ndarray, wanted: np.ndarray | None = None):
    """Log-probabilities of `tokens` [L]: all next-token log-probs [L - 1] (wanted None), or the rows of the
    positions `wanted` [K] ([K, V] log-softmax)."""
    length = len(tokens)
    padded = np.zeros(-(-length // SEGMENT) * SEGMENT, np.int32)
    padded[:length] = tokens
    cache = ssm_llm.init_cache(config, 1, len(padded))
    nll, rows = np.zeros(length - 1), {}
    for start in range(0, length, SEGMENT):
        count = min(SEGMENT, length - start)
        logits, cache = _step(params, config, jnp.asarray(padded[None, start : start + SEGMENT]), cache, count)
        logp = np.asarray(jax.nn.log_softmax(logits[0, :count].astype(jnp.float32), -1))
        if wanted is None:
            targets = tokens[start + 1 : start + count + 1]
            nll[start : start + len(targets)] = -logp[np.arange(len(targets)), targets]
        else:
            for k in wanted[(wanted >= start) & (wanted < start + count)]:
                rows[int(k)] = logp[k - start]
    return nll if wanted is None else np.stack([rows[int(k)] for k in wanted])


def _step(params, config, tokens, cache, count):
    return ssm_llm.forward(params, config, tokens, cache, token_counts=jnp.asarray([count], jnp.int32))


def perplexity_buckets(params, config, windows: np.ndarray, train_len: int) -> dict:
    nll = np.stack([_forward_segments(params, config, w) for w in windows])  # [W, 16T]
    buckets = {"1x": (0, train_len), "4x": (train_len, 4 * train_len), "16x": (4 * train_len, 16 * train_len)}
    return {k: float(np.exp(nll[:, a:b].mean())) for k, (a, b) in buckets.items()}


def recall_samples(tokenizer, stream: np.ndarray, lengths, count: int, seed: int = 0):
    """{L: [(context ids, question ids, code ids)]}: the code planted at a random depth of held-out text."""
    rng = np.random.default_rng(seed)
    question = tokenizer(" What is the secret code? The secret code is", add_special_tokens=False).input_ids
    out = {}
    for length in lengths:
        out[length] = []
        for _ in range(count):
            code = "".join(str(d) for d in rng.integers(0, 10, 5))
            plant = tokenizer(f" The secret code is {code}. ", add_special_tokens=False).input_ids
            answer = tokenizer(f" {code}", add_special_tokens=False).input_ids
            filler_len = length - len(plant) - len(question)
            start = int(rng.integers(0, len(stream) - filler_len))
            filler = stream[start : start + filler_len].tolist()
            depth = int(rng.integers(0, filler_len + 1))
            out[length].append((filler[:depth] + plant + filler[depth:], question, answer))
    return out


def recall(params, config, samples, newline: list[int]) -> dict:
    """Per layout and context length: mean code loss (nats per token) and exact-recall rate."""
    result = {}
    for layout in ("plain", "jrt"):
        for length, rows in samples.items():
            losses, exact = [], []
            for context, question, answer in rows:
                prompt = (
                    context + question if layout == "plain" else read_twice_ids(context, question, separator=newline)
                )
                seq = np.asarray(prompt + answer, np.int32)
                wanted = np.arange(len(prompt) - 1, len(seq) - 1)
                logp = _forward_segments(params, config, seq, wanted)
                losses.append(float(-logp[np.arange(len(answer)), answer].mean()))
                exact.append(bool((logp.argmax(-1) == np.asarray(answer)).all()))
            result[f"{layout}/{length}"] = {"code_loss": float(np.mean(losses)), "exact": float(np.mean(exact))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory exported by experiments/train_mamba2.py")
    parser.add_argument("--train-len", type=int, default=256, help="the windows the model was trained on")
    parser.add_argument("--windows", type=int, default=6, help="perplexity windows of 16 x train-len tokens")
    parser.add_argument("--samples", type=int, default=6, help="recall samples per context length")
    parser.add_argument(
        "--variants",
        default=None,
        help="decay:scale pairs to run, e.g. '1:1,0.99:1' (default: all of VARIANTS)",
    )
    parser.add_argument("--quick", action="store_true", help="a random tiny Mamba-2, 2 windows, 2 samples")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stuffed_mamba_eval.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    tokenizer = converters.load_tokenizer(ssm_llm.default_model_path())
    if args.quick:
        args.windows, args.samples, args.train_len = 2, 2, 64
        config = ssm_llm.Mamba2Config(
            vocab_size=49152, hidden_size=64, num_layers=2, state_size=16, intermediate_size=128, num_heads=4,
            head_dim=32, chunk_size=32,
        )  # fmt: skip
        params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    else:
        config, params = converters.load(args.model)
    if not isinstance(config, ssm_llm.Mamba2Config):
        raise SystemExit(f"the fix is built for Mamba-2; {args.model} holds a {type(config).__name__}")
    stream = text_corpus.corpus_tokens("eval", tokenizer=tokenizer)
    windows = text_corpus.eval_windows(stream, 16 * args.train_len, args.windows)
    lengths = [args.train_len, 4 * args.train_len, 16 * args.train_len]
    samples = recall_samples(tokenizer, stream, lengths, args.samples)
    newline = tokenizer("\n", add_special_tokens=False).input_ids

    variants = VARIANTS
    if args.variants:
        variants = [tuple(float(v) for v in pair.split(":")) for pair in args.variants.split(",")]
    rows = []
    for decay, scale in tqdm(variants, desc="variants"):
        variant = dataclasses.replace(config, state_decay=decay, state_input_scale=scale)
        row = {"state_decay": decay, "state_input_scale": scale, "name": _name(decay, scale)}
        row["perplexity"] = perplexity_buckets(params, variant, windows, args.train_len)
        row["recall"] = recall(params, variant, samples, newline)
        rows.append(row)
        print(
            row["name"], row["perplexity"], {k: round(v["code_loss"], 2) for k, v in row["recall"].items()}, flush=True
        )

    out = {
        "script": "experiments/stuffed_mamba_eval.py",
        "machine": machine_info(),
        "model": str(args.model) if not args.quick else "random tiny Mamba-2 (--quick)",
        "config": config.to_dict(),
        "train_len": args.train_len,
        "windows": args.windows,
        "samples": args.samples,
        "rows": rows,
        "total_wall_s": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = np.arange(3)
    for row in rows:
        axes[0].plot(xs, [row["perplexity"][k] for k in ("1x", "4x", "16x")], marker="o", label=row["name"])
        plain = [row["recall"][f"plain/{n}"]["code_loss"] for n in lengths]
        jrt = [row["recall"][f"jrt/{n}"]["code_loss"] for n in lengths]
        (line,) = axes[1].plot(xs, plain, marker="o", label=row["name"])
        axes[1].plot(xs, jrt, marker="x", ls="--", color=line.get_color())
    for ax, label in zip(axes, ("held-out perplexity", "planted code loss (nats/token; dashed: JRT)"), strict=True):
        ax.set_xticks(xs, [f"{k} ({n} tok)" for k, n in zip(("1x", "4x", "16x"), lengths, strict=True)])
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Mamba-2 trained on {args.train_len}-token windows, past its training length")
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
