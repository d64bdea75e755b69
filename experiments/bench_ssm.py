"""Mamba-2 speed of ssm_llm vs Hugging Face transformers (PyTorch, float32, CPU) on a ~130M-parameter model.

The model is `transformers.Mamba2ForCausalLM` with random weights (fixed torch seed) in the shape of
mamba2-130m (24 layers, hidden 768, 24 heads of 64, state 128, 1 group, chunk 256); transformers runs
its pure-torch path (no mamba_ssm / causal_conv1d kernels on CPU). ssm_llm gets the very same weights
through `converters.load(model)`, and is measured in both layer layouts (`ssm_llm.layer_layout`):
stacked (lax.scan, the default) and unstacked (unrolled loop).
All runners live in this one process and are interleaved repeat by repeat (the order rotates every
repeat); every figure is the median of end-to-end `generate` calls as a user makes them, greedy, no
EOS stop, random prompt token ids (fixed numpy seed):
  * prefill time  = t(1 new token), batch 1, for 1024- and 4096-token prompts; the ratio
                    t(4096) / t(1024) is ~4 if prefill time grows linearly with length
  * decode tok/s  = (N - 1) * batch / (t(N new tokens) - t(1 new token)), batch 1 and batch 16,
                    64-token prompts (prefill cancels out)
  * greedy agreement: the fraction of sequences (and of token positions) where ssm_llm's greedy
    tokens equal transformers' (random weights give near-ties, so this is reported, not asserted)
ssm_llm runs every shape once untimed first (it compiles per shape); transformers compiles nothing
and gets that warm-up only in the cheap cases (1024-token prefill, batch-1 decode). The expensive
cases get fewer repeats: transformers' 4096-token prefill takes tens of seconds on 2 cores
(`--long-repeats`), and the batch-16 decode case is dominated by transformers' prefill, which pads
each 64-token prompt to a whole 256-step SSD chunk (`--batch-repeats`).
Writes experiments/results/bench_ssm.json (+ .png) and prints a table of ratios last.

    python experiments/bench_ssm.py            # full run (~10-15 min on 2 cores)
    python experiments/bench_ssm.py --quick    # smoke run: tiny model, short prompts -> bench_ssm_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_runners import Ours, Peer, machine_info, speedup_bars  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0

# mamba2-130m's shape (state-spaces/mamba2-130m), random weights.
FULL_CONFIG = dict(
    vocab_size=50288,
    hidden_size=768,
    num_hidden_layers=24,
    state_size=128,
    expand=2,
    num_heads=24,
    head_dim=64,
    n_groups=1,
    chunk_size=256,
    conv_kernel=4,
    tie_word_embeddings=True,
)
# --quick: a tiny model with several chunks per prompt, so the same code paths run in seconds.
QUICK_CONFIG = dict(
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=2,
    state_size=16,
    expand=2,
    num_heads=4,
    head_dim=64,
    n_groups=1,
    chunk_size=64,
    conv_kernel=4,
    tie_word_embeddings=True,
)


def random_prompts(rng: np.random.Generator, vocab: int, length: int, batch: int) -> list[list[int]]:
    return rng.integers(0, vocab, size=(batch, length)).tolist()


def measure(runners, prompts, counts, repeats, warm=None, desc=""):
    """Wall times per runner of generating each of `counts` new tokens, interleaved: every repeat runs
    every runner once per count (runner order rotating by repeat). `warm`: names of the runners given
    one untimed call per count first (default: all). Returns each runner's wall times
    {name: {count: [s, ...]}}, its tokens from its last call per count, and ssm_llm's own prefill /
    decode split of every timed call (`GenerationResult`)."""
    warm = {r.name for r in runners} if warm is None else set(warm)
    for r in runners:
        if r.name in warm:
            for n in counts:
                r.generate(prompts, n)
    times = {r.name: {n: [] for n in counts} for r in runners}
    tokens = {r.name: {} for r in runners}
    splits = {r.name: {n: [] for n in counts} for r in runners if isinstance(r, Ours)}
    bar = tqdm(total=repeats * len(runners), desc=desc, leave=False)
    for rep in range(repeats):
        shift = rep % len(runners)
        for r in runners[shift:] + runners[:shift]:
            for n in counts:
                t, tokens[r.name][n] = r.generate(prompts, n)
                times[r.name][n].append(t)
                if r.name in splits:
                    splits[r.name][n].append(r.last_split)
            bar.update()
    bar.close()
    return times, tokens, splits


def median_split(splits: list[dict]) -> dict:
    return {k: statistics.median(s[k] for s in splits) for k in splits[0]}


def agreement(ours, theirs) -> dict:
    """How often two runners' greedy tokens agree: whole sequences, and positions up to the first difference."""
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    prefix = []
    for a, b in zip(ours, theirs, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        prefix.append(k / len(a))
    return {"sequences_identical": sum(same) / len(same), "mean_matching_prefix": sum(prefix) / len(prefix)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64, help="N in the decode cases")
    parser.add_argument("--batch", type=int, default=16, help="batch of the batched decode case")
    parser.add_argument("--decode-prompt", type=int, default=64, help="prompt tokens in the decode cases")
    parser.add_argument("--short-prompt", type=int, default=1024, help="prompt tokens of the shorter prefill case")
    parser.add_argument("--long-prompt", type=int, default=4096, help="prompt tokens of the longer prefill case")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the batch-1 decode case")
    parser.add_argument(
        "--batch-repeats",
        type=int,
        default=3,
        help="timed repeats of the batched decode case (its prompts fill whole SSD chunks: slow)",
    )
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed repeats of the short prefill")
    parser.add_argument("--long-repeats", type=int, default=2, help="timed repeats of the long prefill")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model and prompts (64/256 tokens), to check the script works; "
        "writes bench_ssm_quick.json so real results are never overwritten",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench_ssm[_quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.batch, args.decode_prompt = 8, 4, 16
        args.short_prompt, args.long_prompt = 64, 256
        args.repeats = args.batch_repeats = args.prefill_repeats = args.long_repeats = 3  # ms per call here
    if args.batch < 2 or args.new_tokens < 2 or args.short_prompt >= args.long_prompt:
        parser.error("need --batch >= 2, --new-tokens >= 2 and --short-prompt < --long-prompt")
    if args.out is None:
        args.out = RESULTS / ("bench_ssm_quick.json" if args.quick else "bench_ssm.json")
    wall_start = time.perf_counter()

    import transformers

    torch.manual_seed(SEED)
    hf_config = transformers.Mamba2Config(**(QUICK_CONFIG if args.quick else FULL_CONFIG))
    hf = transformers.Mamba2ForCausalLM(hf_config).float().eval()
    n_params = sum(p.numel() for p in hf.parameters())
    config, params = converters.load(hf)
    ours = [Ours(params, config, "ssm_llm"), Ours(ssm_llm.unstack_layers(params), config, "ssm_llm unrolled")]
    peer = Peer(hf)
    runners = [*ours, peer]
    names = [r.name for r in ours]
    rng = np.random.default_rng(SEED)
    vocab = hf_config.vocab_size

    rows = {}
    progress = tqdm(total=4, desc="cases")
    # Prefill: t(1 new token), batch 1.
    for length, repeats, warm in (
        (args.short_prompt, args.prefill_repeats, None),
        (args.long_prompt, args.long_repeats, names),
    ):
        label = f"prefill {length} tokens"
        prompts = random_prompts(rng, vocab, length, 1)
        times, tokens, splits = measure(runners, prompts, [1], repeats, warm=warm, desc=label)
        rows[label] = {"prompt_tokens": length, "batch": 1, "repeats": repeats, "transformers_warmed_up": warm is None}
        for r in runners:
            rows[label][r.name] = {"t_1_token_s": statistics.median(times[r.name][1]), "times_s": times[r.name][1]}
            if r.name in splits:
                rows[label][r.name]["own_split_median"] = median_split(splits[r.name][1])
        rows[label]["first_token_identical"] = {n: tokens[n][1] == tokens[peer.name][1] for n in names}
        progress.update()
    # Decode: (N - 1) * batch / (t(N) - t(1)).
    for batch, repeats, warm in ((1, args.repeats, None), (args.batch, args.batch_repeats, names)):
        label = f"decode b={batch}"
        prompts = random_prompts(rng, vocab, args.decode_prompt, batch)
        n = args.new_tokens
        times, tokens, splits = measure(runners, prompts, [1, n], repeats, warm=warm, desc=label)
        rows[label] = {
            "prompt_tokens": args.decode_prompt,
            "batch": batch,
            "n": n,
            "repeats": repeats,
            "transformers_warmed_up": warm is None,
        }
        for r in runners:
            t1, tn = statistics.median(times[r.name][1]), statistics.median(times[r.name][n])
            rows[label][r.name] = {
                "t_1_token_s": t1,
                "t_n_tokens_s": tn,
                "decode_tok_s": (n - 1) * batch / (tn - t1),
                "times_1_s": times[r.name][1],
                "times_n_s": times[r.name][n],
            }
            if r.name in splits:  # cross-check from ssm_llm's own timers (no peer equivalent)
                own = median_split(splits[r.name][n])
                rows[label][r.name]["own_split_median_n"] = own
                rows[label][r.name]["own_decode_tok_s"] = n * batch / own["decode_s"]
        rows[label]["greedy_agreement_with_transformers"] = {
            name: agreement(tokens[name][n], tokens[peer.name][n]) for name in names
        }
        rows[label]["layouts_identical"] = tokens[names[0]][n] == tokens[names[1]][n]
        progress.update()
    progress.close()

    short, long = f"prefill {args.short_prompt} tokens", f"prefill {args.long_prompt} tokens"
    decode_labels = ["decode b=1", f"decode b={args.batch}"]
    length_ratio = args.long_prompt / args.short_prompt
    summary = {}
    for label in decode_labels:
        peer_tok_s = rows[label][peer.name]["decode_tok_s"]
        summary[label] = {"transformers_tok_s": peer_tok_s}
        for name in names:
            summary[label][f"{name}_tok_s"] = rows[label][name]["decode_tok_s"]
            summary[label][f"{name}_speedup"] = rows[label][name]["decode_tok_s"] / peer_tok_s
            summary[label][f"{name}_sequences_identical"] = rows[label]["greedy_agreement_with_transformers"][name][
                "sequences_identical"
            ]
    for label in (short, long):
        peer_s = rows[label][peer.name]["t_1_token_s"]
        summary[label] = {"transformers_s": peer_s}
        for name in names:
            summary[label][f"{name}_s"] = rows[label][name]["t_1_token_s"]
            summary[label][f"{name}_speedup"] = peer_s / rows[label][name]["t_1_token_s"]
    scaling = {"length_ratio": length_ratio}
    for r in runners:
        scaling[r.name] = rows[long][r.name]["t_1_token_s"] / rows[short][r.name]["t_1_token_s"]
    summary[f"prefill scaling t({args.long_prompt}) / t({args.short_prompt})"] = scaling
    b1, bn = (rows[label] for label in decode_labels)
    batch_gain = {r.name: bn[r.name]["decode_tok_s"] / b1[r.name]["decode_tok_s"] for r in runners}
    summary[f"batch-{args.batch} / batch-1 throughput"] = batch_gain
    targets = {
        "decode >= 2x transformers": {
            label: {name: summary[label][f"{name}_speedup"] >= 2.0 for name in names} for label in decode_labels
        },
        # "linear" = within 25% of the length ratio (a fixed per-call overhead pulls it below)
        f"prefill linear in length (t ratio <= {1.25 * length_ratio:g})": {
            name: scaling[name] <= 1.25 * length_ratio for name in names
        },
    }

    machine = machine_info()
    result = {
        "script": "experiments/bench_ssm.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seed": SEED,
        "machine": machine,
        "model": {
            "transformers_config": QUICK_CONFIG if args.quick else FULL_CONFIG,
            "parameters": n_params,
            "weights": "random (transformers' default init, torch.manual_seed(seed))",
            "transformers_path": "pure torch (torch_forward; mamba_ssm not installed)",
            "dtype": "float32",
        },
        "method": {
            "prefill": "median t(1 new token), batch 1; the long prompt has --long-repeats timed runs",
            "decode": "median (N-1)*batch/(t(N)-t(1)); own_decode_tok_s: N*batch/ssm_llm's own "
            "decode_seconds (includes the first token's sampling, excludes prefill)",
            "warm_up": "one untimed call per shape for ssm_llm (compilation); transformers only in "
            "the cheap cases (it compiles nothing), see rows[...].transformers_warmed_up",
            "order": "runners interleaved repeat by repeat, order rotating",
        },
        "rows": rows,
        "summary": summary,
        "targets": targets,
        "total_wall_s": time.perf_counter() - wall_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(summary, scaling, args.out.with_suffix(".png"), [short, long], decode_labels)

    title = "tiny Mamba-2 (--quick)" if args.quick else f"Mamba-2 {n_params / 1e6:.0f}M (random weights)"
    print(f"\n{title}, float32, {machine['cpu']} ({machine['cores']} cores); results: {args.out}")
    print(f"{'case':<22}" + "".join(f"{n:>26}" for n in names) + f"{'transformers':>14}  same tokens")
    for label in decode_labels:
        s = summary[label]
        cells = "".join(f"{s[n + '_tok_s']:>14.1f} t/s ({s[n + '_speedup']:>5.2f}x)" for n in names)
        same = "/".join(f"{s[n + '_sequences_identical']:.0%}" for n in names)
        print(f"{label:<22}{cells}{s['transformers_tok_s']:>10.1f} t/s  {same}")
    for label in (short, long):
        s = summary[label]
        cells = "".join(f"{s[n + '_s']:>16.3f} s ({s[n + '_speedup']:>5.2f}x)" for n in names)
        print(f"{label:<22}{cells}{s['transformers_s']:>12.3f} s")
    cells = "".join(f"{scaling[n]:>26.2f}" for n in names)
    print(
        f"{'prefill ' + f't({args.long_prompt})/t({args.short_prompt})':<22}{cells}{scaling[peer.name]:>14.2f}"
        f"  (linear: {length_ratio:g})"
    )
    print(f"batch-{args.batch} throughput / batch-1: " + ", ".join(f"{n} {g:.1f}x" for n, g in batch_gain.items()))
    print(
        "targets: ours >= 2x transformers on decode: "
        + ", ".join(
            f"{label} {'/'.join('yes' if ok else 'NO' for ok in per.values())}"
            for label, per in targets["decode >= 2x transformers"].items()
        )
        + f"; prefill linear in length (ratio ~{length_ratio:g}): "
        + "/".join("yes" if ok else "NO" for ok in list(targets.values())[1].values())
        + f"   [ours: {' / '.join(names)}]"
    )
    if args.quick:
        print(
            "(--quick: millisecond calls on a tiny model, so the ratios are noise, even negative; "
            "this only checks that the script runs)"
        )


def plot(summary, scaling, path, prefill_labels, decode_labels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = decode_labels + prefill_labels
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    speedup_bars(ax, summary, labels)
    ax.axvline(2.0, color="tab:red", linestyle=":", linewidth=1, label="decode target 2x")
    ax.legend(loc="best", fontsize=8)

    runners = [k for k in scaling if k != "length_ratio"]
    values = [scaling[k] for k in runners]
    ax2.bar(range(len(runners)), values, color=[f"C{i}" for i in range(len(runners))])
    for i, v in enumerate(values):
        ax2.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2.axhline(scaling["length_ratio"], color="gray", linestyle="--", label=f"linear ({scaling['length_ratio']:g})")
    ax2.set_xticks(range(len(runners)), runners, fontsize=8)
    ax2.set_ylabel("prefill time ratio")
    ax2.set_title(f"{prefill_labels[1]} / {prefill_labels[0]}", fontsize=9)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
