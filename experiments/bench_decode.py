"""Decode and prefill speed of ssm_llm vs Hugging Face transformers (PyTorch, float32) on SmolLM2-135M.

Both run in this one process, on the same dequantized float32 weights, interleaved repeat by repeat.
ssm_llm is measured in both layer layouts (`ssm_llm.layer_layout`): stacked (lax.scan, the default)
and unstacked (unrolled loop, faster on CPU).
Every figure is end-to-end `generate` as a user calls it, greedy, no EOS stop:
  * decode tok/s  = (N - 1) * batch / (t(N new tokens) - t(1 new token))   (prefill cancels out)
  * prefill time  = t(1 new token) for a 512-token prompt
`--quantize w8a8` (or w8a16 / w4a16; w8a8-rot: W8A8 with `rotation=True`; -emb: with `embedding=True`, and
w8a8-rot-emb as its preset with `head_residual=True`) adds
ssm_llm on the weight-quantized model (`ssm_llm.quantize_weights`) in both layouts; its greedy tokens differ from
float32's, so it reports the fraction of them that agree. A W8A8 model runs its few-row products through the compiled
CPU kernel (`config.int8_dot="auto"`, `pallas_kernels.cpu_int8_dot`), on the plain [K, N] codes and, named
"... blocked", in the kernel's blocked layout (`ssm_llm.int8_blocks`, what `converters.load` gives where the kernel
runs); `--xla-int8-dot` adds each W8A8 variant again with `int8_dot="xla"` (XLA's integer dot, the same numbers),
named "... xla-dot".
`--peer-python PY` adds llama.cpp (llama-cpp-python in the virtual environment of PY, on the shipped Q4_1
GGUF file itself, as many threads as cores) to the batch-1 cases, timed by `llama_cpp_decode.py` in a child
process after the others, and reports each ssm_llm runner's ratio to it.
Writes experiments/results/bench_decode.json (+ .png) and prints a table of ratios last.

    python experiments/bench_decode.py            # full run (~10 min on 2 cores)
    python experiments/bench_decode.py --quantize w8a8 w8a8-rot --out experiments/results/bench_decode_w8a8.json
    python experiments/bench_decode.py --quantize w8a8-rot --peer-python /tmp/llamavenv/bin/python
    python experiments/bench_decode.py --quantize w8a8-rot-emb --xla-int8-dot --batch 4 \
        --out experiments/results/bench_decode_int8_dot.json
    python experiments/bench_decode.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from bench_runners import Ours, Peer, machine_info, speedup_bars  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402
from ssm_llm.config import WEIGHT_BITS  # noqa: E402
from ssm_llm.int8_blocks import for_cpu_kernel  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# --quantize names beyond the plain schemes: (scheme, quantize_weights options).
VARIANTS = {
    "w8a8-rot": ("w8a8", {"rotation": True}),
    "w8a8-emb": ("w8a8", {"embedding": True}),
    "w8a8-rot-emb": ("w8a8", {"rotation": True, "embedding": True, "head_residual": True}),  # the preset
}


def prompts_of(tokenizer, length: int, batch: int) -> list[list[int]]:
    """`batch` distinct real-text prompts of exactly `length` tokens (Python's language reference)."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text[: 40 * length * (batch + 1)]).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def measure(runner, prompts, n, repeats):
    """Median wall time of generating 1 and n tokens; the first (compile / warm-up) call is discarded."""
    runner.generate(prompts, 1)
    runner.generate(prompts, n)
    one, full, tokens = [], [], None
    for _ in range(repeats):
        one.append(runner.generate(prompts, 1)[0])
        t, tokens = runner.generate(prompts, n)
        full.append(t)
    t1, tn = statistics.median(one), statistics.median(full)
    return {
        "t_1_token_s": t1,
        "t_n_tokens_s": tn,
        "n": n,
        "batch": len(prompts),
        "decode_tok_s": (n - 1) * len(prompts) / (tn - t1),
        "tokens": tokens,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--quantize", nargs="*", default=[], choices=[*WEIGHT_BITS, *VARIANTS])
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_decode.json")
    parser.add_argument("--peer-python", help="python of a virtual environment with llama-cpp-python")
    parser.add_argument("--xla-int8-dot", action="store_true", help="also run W8A8 variants with int8_dot='xla'")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.batch = 8, 1, 2

    from transformers import AutoModelForCausalLM

    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    tokenizer = converters.load_tokenizer(path)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = [Ours(params, config, "ssm_llm"), Ours(ssm_llm.unstack_layers(params), config, "ssm_llm unrolled")]
    float_names = {r.name for r in ours}
    for scheme in args.quantize:
        base, options = VARIANTS.get(scheme, (scheme, {}))
        qparams, qconfig = ssm_llm.quantize_weights(params, config, base, **options)
        ours += [
            Ours(qparams, qconfig, f"ssm_llm {scheme}"),
            Ours(ssm_llm.unstack_layers(qparams), qconfig, f"ssm_llm {scheme} unrolled"),
        ]
        blocked = for_cpu_kernel(qparams, qconfig)  # the layout converters.load gives W8A8 models here
        if blocked is not qparams:
            ours += [
                Ours(blocked, qconfig, f"ssm_llm {scheme} blocked"),
                Ours(ssm_llm.unstack_layers(blocked), qconfig, f"ssm_llm {scheme} unrolled blocked"),
            ]
        if args.xla_int8_dot and base == "w8a8":
            xla_config = dataclasses.replace(qconfig, int8_dot="xla")
            ours += [
                Ours(qparams, xla_config, f"ssm_llm {scheme} xla-dot"),
                Ours(ssm_llm.unstack_layers(qparams), xla_config, f"ssm_llm {scheme} unrolled xla-dot"),
            ]
    runners = [*ours, Peer(hf)]

    cases = [
        ("decode b=1 ctx=128", 128, 1, args.new_tokens),
        ("decode b=1 ctx=512", 512, 1, args.new_tokens),
        (f"decode b={args.batch} ctx=128", 128, args.batch, args.new_tokens),
    ]
    rows = {}
    for label, ctx, batch, n in tqdm(cases, desc="cases"):
        prompts = prompts_of(tokenizer, ctx, batch)
        rows[label] = {r.name: measure(r, prompts, n, args.repeats) for r in runners}
        tokens = {r.name: rows[label][r.name].pop("tokens") for r in runners}
        peer_tokens = tokens["transformers"]
        rows[label]["identical_greedy_tokens"] = all(tokens[n] == peer_tokens for n in float_names)
        for r in ours:
            if r.name not in float_names:  # quantized: the share of greedy tokens equal to float32's
                pairs = [
                    (a, b) for x, y in zip(tokens[r.name], peer_tokens, strict=True) for a, b in zip(x, y, strict=True)
                ]
                rows[label][r.name]["greedy_agreement"] = sum(a == b for a, b in pairs) / len(pairs)

    if args.peer_python:
        for label, ctx, batch, n in cases:
            if batch == 1:
                rows[label]["llama.cpp"] = llama_cpp_measure(
                    args.peer_python, path, prompts_of(tokenizer, ctx, 1), n, args
                )

    summary = {}
    for label in rows:
        peer = rows[label]["transformers"]["decode_tok_s"]
        summary[label] = {"transformers_tok_s": peer}
        for r in ours:
            summary[label][f"{r.name}_tok_s"] = rows[label][r.name]["decode_tok_s"]
            summary[label][f"{r.name}_speedup"] = rows[label][r.name]["decode_tok_s"] / peer
        if "llama.cpp" in rows[label]:
            llama = rows[label]["llama.cpp"]["decode_tok_s"]
            summary[label]["llama.cpp_tok_s"] = llama
            for r in ours:
                summary[label][f"{r.name}_vs_llama.cpp"] = rows[label][r.name]["decode_tok_s"] / llama
    pre = rows["decode b=1 ctx=512"]
    summary["prefill 512 tokens"] = {"transformers_s": pre["transformers"]["t_1_token_s"]}
    for r in ours:
        summary["prefill 512 tokens"][f"{r.name}_s"] = pre[r.name]["t_1_token_s"]
        summary["prefill 512 tokens"][f"{r.name}_speedup"] = (
            pre["transformers"]["t_1_token_s"] / pre[r.name]["t_1_token_s"]
        )
    batch_gain = {}
    for r in ours:
        b1 = rows["decode b=1 ctx=128"][r.name]["decode_tok_s"]
        bn = rows[f"decode b={args.batch} ctx=128"][r.name]["decode_tok_s"]
        batch_gain[r.name] = bn / b1
    summary[f"batch-{args.batch} / batch-1 throughput"] = batch_gain

    result = {
        "script": "experiments/bench_decode.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "model": str(path.name),
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(summary, args.out.with_suffix(".png"))

    names = [r.name for r in ours]
    print(f"\nSmolLM2-135M, float32, {machine_info()['cpu']} ({os.cpu_count()} cores); results: {args.out}")
    print(f"{'case':<22}" + "".join(f"{n:>22}" for n in names) + f"{'transformers':>14}  same tokens")
    for label in rows:
        s = summary[label]
        cells = "".join(f"{s[n + '_tok_s']:>10.1f} t/s ({s[n + '_speedup']:.2f}x)" for n in names)
        print(f"{label:<22}{cells}{s['transformers_tok_s']:>10.1f} t/s  {rows[label]['identical_greedy_tokens']}")
    s = summary["prefill 512 tokens"]
    cells = "".join(f"{s[n + '_s']:>12.3f} s ({s[n + '_speedup']:.2f}x)" for n in names)
    print(f"{'prefill 512 tokens':<22}{cells}{s['transformers_s']:>12.3f} s")
    print(f"batch-{args.batch} throughput / batch-1: " + ", ".join(f"{n} {g:.1f}x" for n, g in batch_gain.items()))
    for label in rows:
        if "llama.cpp_tok_s" in summary[label]:
            s = summary[label]
            ratios = ", ".join(f"{n} {s[n + '_vs_llama.cpp']:.2f}x" for n in names)
            print(f"{label}: llama.cpp (Q4_1) {s['llama.cpp_tok_s']:.1f} t/s; ours / llama.cpp: {ratios}")


def llama_cpp_measure(python: str, model: Path, prompts: list[list[int]], n: int, args) -> dict:
    """llama.cpp's `measure` for batch-1 `prompts`, by `llama_cpp_decode.py` under the peer's python."""
    import subprocess

    job = {"model": str(model), "threads": os.cpu_count() or 2, "prompts": prompts, "n": n, "repeats": args.repeats}
    script = Path(__file__).with_name("llama_cpp_decode.py")
    done = subprocess.run([python, str(script)], input=json.dumps(job), capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    t1, tn = got["t_1_token_s"], got["t_n_tokens_s"]
    return {"t_1_token_s": t1, "t_n_tokens_s": tn, "n": n, "batch": 1, "decode_tok_s": (n - 1) / (tn - t1)}


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in summary if k.startswith(("decode", "prefill"))]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    speedup_bars(ax, summary, labels)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
