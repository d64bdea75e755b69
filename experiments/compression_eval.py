"""Weight compression on SmolLM2-135M-Instruct: DFloat11's size and speed, BitStack's perplexity-memory curve.

DFloat11 (`ssm_llm.compress.dfloat11`): bytes of the weights against bfloat16 (per kind of tensor and in all,
tables and block starts included), the exponents' entropy and one code's mean length over the whole model,
whether greedy generation and the prompt's logits are identical, and decode speed with the weights decoded inside every
forward, against the bfloat16 model in the same run (layers stacked and unrolled; medians of --repeats).
BitStack (`ssm_llm.compress.bitstack`, float32 base): the linears decomposed once into --blocks residual blocks
(activation-aware scales from calibration text), loaded at budgets of --bits bits per linear weight; perplexity
on held-out real text (text_corpus's eval split, --windows x --seq-len tokens) beside round-to-nearest at 2, 3, 4
and 8 bits and GPTQ at 4 bits (groups of 64 input rows (576 = 9 x 64), a float16 scale each: +0.25 bit per weight).

Layer-wise mixed widths ("mixed": round-to-nearest, layers ranked by LIM / ZD / reversed LIM; "gptq": GPTQ on the
min-max grid at every width, uniform and LIM-mixed, at the same text and memory). "storage": bytes and decode speed
of the integer codes and of BitStack's packed blocks against float32. Also per-matrix errors ("matrix": BitStack's
blocks against rounding on three of SmolLM2's matrices).

One run writes experiments/results/compression_eval.json (+ compression_eval.png) with the CPU model and its
flags; `--parts bitstack` reruns one part and keeps the other's results.

    .venv/bin/python experiments/compression_eval.py [--parts dfloat11 bitstack mixed gptq storage matrix]
        [--new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
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
from pallas_kernels.dfloat11 import DFloat11Weight
from pallas_kernels.quantized_matmul import dequantize_weights, quantize_weights
from ssm_llm.compress import (
    allocate_bits,
    bits_per_weight,
    bitstack,
    compressed_bytes,
    dfloat11,
    layer_scores,
    load_budget,
    quantize_layers,
)
from ssm_llm.compress.bitstack import decompose, rank_for
from ssm_llm.compress.dfloat11 import code_lengths
from ssm_llm.layer_layout import unstack_layers

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _exponent_stats(params) -> dict:
    """Entropy of the bfloat16 exponents of every matrix, in bits per weight."""
    counts = np.zeros(256, np.int64)
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.ndim >= 2:
            counts += np.bincount((np.asarray(leaf).view(np.uint16).reshape(-1) >> 7) & 0xFF, minlength=256)
    p = counts[counts > 0] / counts.sum()
    mean = {bits: float((code_lengths(counts, bits) * counts).sum() / counts.sum()) for bits in (10, 12, 25)}
    return {
        "distinct_exponents": int((counts > 0).sum()),
        "entropy_bits": float(-(p * np.log2(p)).sum()),
        "mean_code_bits_one_code": {"max 10 bits": mean[10], "max 12 bits (the default)": mean[12], "max 25": mean[25]},
    }


def _sizes(packed) -> dict:
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(packed, is_leaf=lambda x: isinstance(x, DFloat11Weight))[0]
    for path, leaf in leaves:
        if isinstance(leaf, DFloat11Weight):
            parts = {n: int(getattr(leaf, n).nbytes) for n in ("sign_mantissa", "stream", "block_starts", "table")}
            weights = int(np.prod(leaf.shape))
            out[jax.tree_util.keystr(path)] = {
                "weights": weights,
                "ratio": sum(parts.values()) / (2 * weights),
                "stream_bits_per_weight": 8 * parts["stream"] / weights,
            }
    return out


def _decode_speed(params, config, ids, n, repeats):
    gen = ssm_llm.GenerationConfig(max_new_tokens=n, eos_token_ids=(), max_len=len(ids) + n)
    result = ssm_llm.generate(params, config, [ids], gen)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = ssm_llm.generate(params, config, [ids], gen)
        times.append(time.perf_counter() - start)
        assert out.tokens == result.tokens
    decode = [ssm_llm.generate(params, config, [ids], gen).decode_seconds for _ in range(1)]
    return result.tokens[0], {
        "wall_s": float(np.median(times)),
        "tok_s": n / float(np.median(times)),
        "decode_s": decode[0],
    }


def _dfloat11_part(args) -> dict:
    path = ssm_llm.default_model_path()
    config, params = converters.load(path, dtype=jnp.bfloat16)
    tokenizer = converters.load_tokenizer(path)
    ids = tokenizer.encode(PROMPT)
    start = time.perf_counter()
    packed = dfloat11(params)
    encode_s = time.perf_counter() - start
    stored, original = compressed_bytes(packed)
    print(f"DFloat11: {stored / 1e6:.1f} MB of {original / 1e6:.1f} MB bfloat16 ({stored / original:.3f})")

    cache = ssm_llm.init_cache(config, 1, len(ids), dtype=jnp.bfloat16)
    want, _ = ssm_llm.forward(params, config, jnp.asarray([ids]), cache)
    got, _ = ssm_llm.forward(packed, config, jnp.asarray([ids]), cache)
    logits_identical = bool(np.array_equal(np.asarray(want.astype(jnp.float32)), np.asarray(got.astype(jnp.float32))))

    speed, tokens = {}, {}
    for layout, transform in (("stacked", lambda p: p), ("unrolled", unstack_layers)):
        for name, p in (("bfloat16", params), ("dfloat11", packed)):
            tokens[name, layout], speed[f"{name}_{layout}"] = _decode_speed(
                transform(p), config, ids, args.new_tokens, args.repeats
            )
            print(layout, name, speed[f"{name}_{layout}"])
    identical = all(tokens["dfloat11", lay] == tokens["bfloat16", lay] for lay in ("stacked", "unrolled"))
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized, cast to bfloat16)",
        "bytes": stored,
        "bfloat16_bytes": original,
        "ratio": stored / original,
        "encode_s": encode_s,
        **_exponent_stats(params),
        "prompt_logits_identical": logits_identical,
        "greedy_tokens_identical": identical,
        "new_tokens": args.new_tokens,
        "speed": speed,
        "slowdown_stacked": speed["dfloat11_stacked"]["wall_s"] / speed["bfloat16_stacked"]["wall_s"],
        "slowdown_unrolled": speed["dfloat11_unrolled"]["wall_s"] / speed["bfloat16_unrolled"]["wall_s"],
        "tensors": _sizes(packed),
    }


@functools.partial(jax.jit, static_argnames="config")
def _nll_sum(params, config, window):
    logits, _ = ssm_llm.forward(params, config, window[:, :-1], ssm_llm.init_cache(config, *window[:, :-1].shape))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, window[:, 1:, None], axis=-1).sum()


def _perplexity(params, config, windows, batch: int = 4) -> float:
    total = sum(
        float(_nll_sum(params, config, jnp.asarray(windows[i : i + batch]))) for i in range(0, len(windows), batch)
    )
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def _float32_model_and_text(args):
    """SmolLM2 in float32, calibration token ids [B, T] from the corpus's train split, evaluation windows."""
    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    corpus = text_corpus.load_corpus(text_corpus.SOURCES, tokenizer=converters.load_tokenizer(path))
    train, held_out = corpus.split_tokens("train"), corpus.split_tokens("eval")
    calibration = next(text_corpus.batches(train, args.calib_seqs, args.seq_len, np.random.default_rng(0)))[:, :-1]
    return config, params, calibration, text_corpus.eval_windows(held_out, args.seq_len, args.windows)


def _recorder(config, windows, rows: dict):
    def record(name, p, bits, config=config, **extra):
        start = time.perf_counter()
        rows[name] = {"bits_per_weight": bits, "perplexity": _perplexity(p, config, windows), **extra}
        rows[name]["eval_s"] = time.perf_counter() - start
        print(f"{name:<28} {bits:6.3f} bits/weight  ppl {rows[name]['perplexity']:.3f}")

    return record


def _mixed_part(args) -> dict:
    """Layer-wise mixed widths (round-to-nearest, groups of 64) at 3, 3.5 and 5 average bits: layers ranked by LIM,
    by ZD, and by reversed LIM (a control), beside uniform widths."""
    config, params, calibration, windows = _float32_model_and_text(args)
    rows = {}
    record = _recorder(config, windows, rows)
    record("float32", params, 32.0)
    for bits in (2, 3, 4, 5, 6):
        rounded, qconfig = quantize_layers(params, config, (bits,) * config.num_layers)
        record(f"uniform {bits}-bit", rounded, bits_per_weight(rounded, qconfig), codes=bits, config=qconfig)
    scores = {
        "lim": layer_scores(params, config, "lim", calibration),
        "zd": layer_scores(params, config, "zd"),
    }
    scores["reversed lim"] = -scores["lim"]
    for target, widths in ((3.0, (2, 4)), (3.5, (3, 4)), (5.0, (4, 6))):
        for name, score in scores.items():
            bits = allocate_bits(score, target, widths)
            rounded, qconfig = quantize_layers(params, config, bits)
            average = bits_per_weight(rounded, qconfig)
            record(
                f"mixed {target:g} {widths} {name}",
                rounded,
                average,
                codes=target,
                layer_bits=list(bits),
                config=qconfig,
            )
    return {
        "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "scores": {k: v.tolist() for k, v in scores.items() if k != "reversed lim"},
        "rows": rows,
    }


def _gptq_part(args) -> dict:
    """GPTQ with integer codes at every width (min-max grid, an offset and a scale in float16 per 64 input rows:
    +0.5 bit per weight): uniform widths, layer-wise mixed widths ranked by LIM (and reversed LIM at 3.5, the
    control) at 3 / 3.5 / 5 average bits, and uniform 3 bits in groups of 32, which holds exactly the bytes of the
    3.5 mixture in groups of 64 (4.0 bits per weight)."""
    config, params, calibration, windows = _float32_model_and_text(args)
    rows = {}
    record = _recorder(config, windows, rows)
    lim = layer_scores(params, config, "lim", calibration)

    def run(name, bits, group=64, **extra):
        start = time.perf_counter()
        quantized, qconfig = quantize_layers(
            params, config, bits, group, method="gptq", symmetric=False, calibration=calibration
        )
        seconds = time.perf_counter() - start
        record(name, quantized, bits_per_weight(quantized, qconfig), config=qconfig, quantize_s=seconds, **extra)

    record("float32", params, 32.0)
    for bits in args.gptq_bits:
        run(f"gptq uniform {bits}-bit g64", (bits,) * config.num_layers, codes=bits)
    run("gptq uniform 3-bit g32", (3,) * config.num_layers, group=32, codes=3)
    for target, widths in ((3.0, (2, 4)), (3.5, (3, 4)), (5.0, (4, 6))):
        bits = allocate_bits(lim, target, widths)
        run(f"gptq mixed {target:g} {widths} lim", bits, codes=target, layer_bits=list(bits))
    bits = allocate_bits(-lim, 3.5, (3, 4))
    run("gptq mixed 3.5 (3, 4) reversed lim", bits, codes=3.5, layer_bits=list(bits))
    return {
        "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "calibration_tokens": int(calibration.size),
        "grid": "min-max (asymmetric), float16 scale and offset per group",
        "lim": lim.tolist(),
        "rows": rows,
    }


def _storage_part(args) -> dict:
    """What the integer and packed storage formats cost at run time on SmolLM2 (float32 base, layers unrolled, as the
    mixed and packed models must be): bytes of the linears and greedy decode tok/s of float32, uniform 4-bit codes
    (nibbles) and 3-bit codes (bit planes), the LIM 3.5-bit mixture, and BitStack blocks kept packed at a 4-bit
    budget, side by side in one run."""
    config, params, calibration, _ = _float32_model_and_text(args)
    ids = converters.load_tokenizer(ssm_llm.default_model_path()).encode(PROMPT)
    lim = layer_scores(params, config, "lim", calibration)
    models = {"float32": (unstack_layers(params), config)}
    for name, bits in (
        ("4-bit codes", (4,) * config.num_layers),
        ("3-bit codes", (3,) * config.num_layers),
        ("LIM 3.5-bit mixture", allocate_bits(lim, 3.5, (3, 4))),
    ):
        models[name] = quantize_layers(params, config, bits)
    start = time.perf_counter()
    stack = bitstack(params, config, calibration, blocks=args.storage_blocks)
    decompose_s = time.perf_counter() - start
    models["BitStack packed, 4-bit budget"] = (
        load_budget(stack, params, int(4 * stack.weights / 8), packed=True)[0],
        config,
    )
    rows = {}
    for name, (p, c) in models.items():
        linear = sum(
            leaf.size * leaf.dtype.itemsize
            for layer in p["layers"]
            for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
            for leaf in jax.tree_util.tree_leaves(layer[n])
        )
        _, speed = _decode_speed(p, c, ids, args.new_tokens, args.repeats)
        rows[name] = {"linear_bytes": int(linear), "bits_per_weight": 8 * linear / stack.weights, **speed}
        print(f"{name:<32} {linear / 1e6:7.1f} MB  {speed['tok_s']:.2f} tok/s")
    base = rows["float32"]["tok_s"]
    for row in rows.values():
        row["speed_vs_float32"] = row["tok_s"] / base
    return {"new_tokens": args.new_tokens, "blocks": args.storage_blocks, "decompose_s": decompose_s, "rows": rows}


def _matrix_part(args) -> dict:
    """Per-matrix errors: BitStack's relative squared error after each block (unscaled, rank "auto") beside
    round-to-nearest at 3 and 4 bits (groups of 64), on layer 5's w_gate, wq and wk."""
    _, params = converters.load(ssm_llm.default_model_path())
    out = {}
    for name in ("w_gate", "wq", "wk"):
        w = np.asarray(params["layers"][name][5], np.float32)
        stack = decompose(w, np.ones(w.shape[0], np.float32), 4, rank_for(w.shape))
        rtn = {b: np.asarray(dequantize_weights(quantize_weights(jnp.asarray(w), b, 64))) for b in (3, 4)}
        out[f"layers.5.{name}"] = {
            "shape": list(w.shape),
            "rank": rank_for(w.shape),
            "bits_per_block": 8 * stack.block_bytes / w.size,
            "bitstack_relative_error": (stack.errors / stack.errors[0]).tolist(),
            "rtn_relative_error": {f"{b}-bit": float(np.sum((r - w) ** 2) / np.sum(w**2)) for b, r in rtn.items()},
        }
        print(name, out[f"layers.5.{name}"])
    return out


def _bitstack_part(args) -> dict:
    config, params, calibration, windows = _float32_model_and_text(args)
    rows = {}
    record = _recorder(config, windows, rows)
    record("float32", params, 32.0)
    for bits in (2, 3, 4, 8):
        rounded, qconfig = quantize_layers(params, config, (bits,) * config.num_layers)
        record(f"rtn {bits}-bit g64", rounded, bits_per_weight(rounded, qconfig), config=qconfig)
    start = time.perf_counter()
    gptq, gptq_config = ssm_llm.quantize_weights(params, config, "w4a16", 64, calibration=calibration, gptq=True)
    rows_time = time.perf_counter() - start
    rows["gptq 4-bit g64"] = {
        "bits_per_weight": 4 + 16 / 64,
        "perplexity": _perplexity(gptq, gptq_config, windows),
        "quantize_s": rows_time,
    }
    print("gptq 4-bit g64", rows["gptq 4-bit g64"])
    start = time.perf_counter()
    stack = bitstack(params, config, calibration, blocks=args.blocks)
    decompose_s = time.perf_counter() - start
    print(f"BitStack: {len(stack.matrices)} matrices x {args.blocks} blocks in {decompose_s:.0f} s")
    for bits in tqdm(args.bits, desc="budgets"):
        budget = int(bits * stack.weights / 8)
        if budget < stack.bytes_for(0):
            continue
        loaded, info = load_budget(stack, params, budget)
        record(f"bitstack {bits:g} bits", loaded, info["bits_per_weight"], budget_bits=bits)
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "calibration_tokens": int(calibration.size),
        "blocks": args.blocks,
        "decompose_s": decompose_s,
        "linear_weights": stack.weights,
        "floor_bits": 8 * stack.bytes_for(0) / stack.weights,
        "rows": rows,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [key for key in ("bitstack", "mixed_bits", "gptq_widths") if key in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    styles = {
        "bitstack": (("bitstack", "o-"), ("rtn", "s--"), ("gptq", "^")),
        "mixed_bits": (("uniform", "s--"), ("mixed", "o")),
        "gptq_widths": (("gptq uniform", "s--"), ("gptq mixed", "o")),
    }
    for ax, part in zip(axes[0], parts, strict=True):
        rows = result[part]["rows"]
        for prefix, style in styles[part]:
            points = sorted((r["bits_per_weight"], r["perplexity"]) for n, r in rows.items() if n.startswith(prefix))
            ax.plot(*zip(*points, strict=True), style, label=prefix)
        ax.axhline(rows["float32"]["perplexity"], color="gray", lw=0.8, label="float32")
        ax.set_yscale("log")
        ax.set_xlabel("bits per linear weight (codes + scales)")
        ax.set_ylabel("perplexity (held-out text)")
        titles = {
            "bitstack": "BitStack vs quantization",
            "mixed_bits": "mixed widths, round-to-nearest",
            "gptq_widths": "mixed widths, GPTQ (min-max)",
        }
        ax.set_title(titles[part])
        ax.legend()
    fig.suptitle("SmolLM2-135M at equal memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["dfloat11", "bitstack", "mixed", "gptq", "storage", "matrix"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--bits", type=float, nargs="+", default=[2.25, 2.5, 3, 3.5, 4, 5, 6, 8])
    parser.add_argument("--gptq-bits", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--storage-blocks", type=int, default=5)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-seqs", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression_eval.json"))
    args = parser.parse_args()

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = machine_info()
    if "dfloat11" in args.parts:
        result["dfloat11"] = _dfloat11_part(args)
    if "bitstack" in args.parts:
        result["bitstack"] = _bitstack_part(args)
    if "mixed" in args.parts:
        result["mixed_bits"] = _mixed_part(args)
    if "gptq" in args.parts:
        result["gptq_widths"] = _gptq_part(args)
    if "storage" in args.parts:
        result["storage"] = _storage_part(args)
    if "matrix" in args.parts:
        result["bitstack_matrices"] = _matrix_part(args)
    if "bitstack" in result or "mixed_bits" in result:
        _plot(result, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.get("dfloat11", {}).items() if k != "tensors"}, indent=2))


if __name__ == "__main__":
    main()
