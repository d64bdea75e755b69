"""Weight compression on SmolLM2-135M-Instruct (bfloat16 as the base): DFloat11's size and speed.

DFloat11 (`ssm_llm.compress.dfloat11`): bytes of the weights against bfloat16 (per kind of tensor and in all,
tables and block starts included), the exponents' entropy and the code's mean length, whether greedy
generation and the prompt's logits are identical, and decode speed with the weights decoded inside every
forward, against the bfloat16 model in the same run (layers stacked and unrolled; medians of --repeats).
One run writes experiments/results/compression_eval.json with the CPU model and its flags.

    .venv/bin/python experiments/compression_eval.py [--new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_runners import machine_info

import converters
import ssm_llm
from pallas_kernels.dfloat11 import DFloat11Weight
from ssm_llm.compress import compressed_bytes, dfloat11
from ssm_llm.layer_layout import unstack_layers

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _exponent_stats(params) -> dict:
    """Entropy of the bfloat16 exponents of every matrix, in bits per weight."""
    counts = np.zeros(256, np.int64)
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.ndim >= 2:
            counts += np.bincount((np.asarray(leaf).view(np.uint16).reshape(-1) >> 7) & 0xFF, minlength=256)
    p = counts[counts > 0] / counts.sum()
    return {"distinct_exponents": int((counts > 0).sum()), "entropy_bits": float(-(p * np.log2(p)).sum())}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression_eval.json"))
    args = parser.parse_args()

    path = ssm_llm.default_model_path()
    config, params = converters.load(path, dtype=jnp.bfloat16)
    tokenizer = converters.load_tokenizer(path)
    ids = tokenizer.encode(PROMPT)
    start = time.perf_counter()
    packed = dfloat11(params)
    encode_s = time.perf_counter() - start
    stored, original = compressed_bytes(packed)
    print(
        f"DFloat11: {stored / 1e6:.1f} MB of {original / 1e6:.1f} MB bfloat16 ({stored / original:.3f}), "
        f"encoded in {encode_s:.1f} s"
    )

    cache = ssm_llm.init_cache(config, 1, len(ids), dtype=jnp.bfloat16)
    want, _ = ssm_llm.forward(params, config, jnp.asarray([ids]), cache)
    got, _ = ssm_llm.forward(packed, config, jnp.asarray([ids]), cache)
    logits_identical = bool(np.array_equal(np.asarray(want.astype(jnp.float32)), np.asarray(got.astype(jnp.float32))))

    speed = {}
    tokens = {}
    for layout, transform in (("stacked", lambda p: p), ("unrolled", unstack_layers)):
        for name, p in (("bfloat16", params), ("dfloat11", packed)):
            tokens[name, layout], speed[f"{name}_{layout}"] = _decode_speed(
                transform(p), config, ids, args.new_tokens, args.repeats
            )
            print(layout, name, speed[f"{name}_{layout}"])
    identical = all(tokens["dfloat11", lay] == tokens["bfloat16", lay] for lay in ("stacked", "unrolled"))
    result = {
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized, cast to bfloat16)",
        "dfloat11": {
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
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result["dfloat11"].items() if k != "tensors"}, indent=2))


if __name__ == "__main__":
    main()
