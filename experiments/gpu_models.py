"""Whole models on a GPU with the compiled Pallas kernels (`impl="pallas"`) against the XLA references
(`impl="xla"`): the same greedy tokens from `generate`, logits within tolerance over a ragged prefill and
decode steps, and decode speed of both.

Models are random `transformers` models built from configs (no download): tiny Llama / Mamba / Mamba-2,
a SmolLM2-135M-shaped Llama (9 query / 3 kv heads of 64, 30 layers), its W8A8 quantization (the
integer-activation matmul kernel) and a Mamba-2-130M-shaped model (24 heads of 64, state 128). Each model
is checked in float32 (run under `JAX_DEFAULT_MATMUL_PRECISION=highest` for exact comparisons, as
`experiments/gpu_check.sh` does). A failure of one model is recorded in the JSON and the others still run.

    python experiments/gpu_models.py --out DIR            # on a GPU -> DIR/gpu_models.json
    python experiments/gpu_models.py --out DIR --quick    # on CPU: tiny models only, impl="interpret"
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import converters
import ssm_llm

# Random models, as `tests/conftest.py` builds them: weights widened so argmax is not a near tie.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
TINY_SSM = dict(vocab_size=101, hidden_size=48, state_size=16, num_hidden_layers=3, expand=2)
MAMBA2_130M_SHAPE = dict(
    vocab_size=50288,
    hidden_size=768,
    state_size=128,
    num_hidden_layers=24,
    expand=2,
    num_heads=24,
    head_dim=64,
    n_groups=1,
    chunk_size=256,
)


def hf_model(kind: str, overrides: dict, seed: int = 0):
    """A random float32 `transformers` model of `kind` ("llama", "mamba", "mamba2"), eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**overrides))
    elif kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**overrides))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias")):
                continue
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15 if p.shape[-1] <= 256 else 0.05)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def prefill_then_decode(params, config, impl: str, prompts, steps: int = 3):
    """Last-prompt-token logits of a right-padded prefill, then `steps` greedy decode steps' logits."""
    width = max(map(len, prompts))
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts])
    counts = jnp.asarray([len(p) for p in prompts])
    cache = ssm_llm.init_cache(config, len(prompts), width + steps)
    logits, cache = ssm_llm.forward(params, config, tokens, cache, token_counts=counts, impl=impl)
    out = [np.asarray(logits)[np.arange(len(prompts)), counts - 1]]
    for _ in range(steps):
        nxt = jnp.asarray(out[-1].argmax(-1))[:, None]
        logits, cache = ssm_llm.forward(params, config, nxt, cache, impl=impl)
        out.append(np.asarray(logits[:, 0]))
    return out


def check_model(name, params, config, prompts, kernel_impl: str, new_tokens: int) -> dict:
    """Logits and greedy tokens of `kernel_impl` against "xla"; decode tokens/s of both (second call)."""
    result = {"model": name}
    got = prefill_then_decode(params, config, kernel_impl, prompts)
    want = prefill_then_decode(params, config, "xla", prompts)
    result["max_abs_logit_diff"] = float(max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)))
    result["logit_scale"] = float(max(np.abs(w).max() for w in want))
    result["same_argmax_per_step"] = [
        bool((g.argmax(-1) == w.argmax(-1)).all()) for g, w in zip(got, want, strict=True)
    ]
    gen = ssm_llm.GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
    tokens = {}
    for impl in ("xla", kernel_impl):
        ssm_llm.generate(params, config, prompts, gen, impl=impl)  # compile
        start = time.perf_counter()
        out = ssm_llm.generate(params, config, prompts, gen, impl=impl)
        wall = time.perf_counter() - start
        tokens[impl] = out.tokens
        result[impl] = {
            "prefill_s": out.prefill_seconds,
            "decode_s": out.decode_seconds,
            "decode_tok_per_s": len(prompts) * new_tokens / out.decode_seconds,
            "wall_s": wall,
        }
    same = [a == b for a, b in zip(tokens["xla"], tokens[kernel_impl], strict=True)]
    result["greedy_tokens_identical"] = all(same)
    result["first_difference"] = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(tokens["xla"], tokens[kernel_impl], strict=True)
    ]
    return result


def models(quick: bool):
    """(name, builder) pairs; a builder returns (params, config)."""

    def load(kind, overrides):
        return lambda: converters.load(hf_model(kind, overrides))

    def quantized(kind, overrides, scheme):
        def build():
            config, params = converters.load(hf_model(kind, overrides))
            params, config = ssm_llm.quantize_weights(params, config, scheme, progress=False)
            return config, params

        return build

    chosen = [
        ("tiny llama", load("llama", TINY_LLAMA)),
        ("tiny mamba", load("mamba", TINY_SSM)),
        ("tiny mamba2", load("mamba2", {**TINY_SSM, "num_heads": 6, "head_dim": 16, "n_groups": 2, "chunk_size": 8})),
        ("tiny llama w8a8", quantized("llama", TINY_LLAMA, "w8a8")),
    ]
    if not quick:
        chosen += [
            ("smollm2-135m-shaped llama", load("llama", SMOLLM2_SHAPE)),
            ("mamba2-130m-shaped", load("mamba2", MAMBA2_130M_SHAPE)),
            ("smollm2-135m-shaped llama w8a8", quantized("llama", SMOLLM2_SHAPE, "w8a8")),
        ]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="tiny models only; impl='interpret' off a GPU")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    kernel_impl = "pallas" if on_gpu else "interpret"
    new_tokens = 4 if args.quick else args.new_tokens
    rng = np.random.default_rng(0)
    report = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "kernel_impl": kernel_impl,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "models": [],
    }
    for name, build in models(args.quick):
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        try:
            config, params = build()
            lengths = (37, 5, 120) if not args.quick else (19, 6)
            prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]
            result = check_model(name, params, config, prompts, kernel_impl, new_tokens)
        except Exception as err:  # record it and go on with the next model
            result = {
                "model": name,
                "error": f"{type(err).__name__}: {err}"[:2000],
                "trace": traceback.format_exc()[-3000:],
            }
        result["seconds"] = time.perf_counter() - start
        print(json.dumps({k: v for k, v in result.items() if k != "trace"}), flush=True)
        report["models"].append(result)
        # Written after each model, so a run stopped by a timeout keeps what it measured.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ("gpu_models_quick.json" if args.quick else "gpu_models.json")).write_text(
            json.dumps(report, indent=2)
        )
    print(f"\n{'model':34} {'tokens equal':>12} {'max |dlogit|':>12} {'xla tok/s':>10} {'pallas tok/s':>12}")
    for r in report["models"]:
        if "error" in r:
            print(f"{r['model']:34} ERROR {r['error'][:120]}")
            continue
        print(
            f"{r['model']:34} {r['greedy_tokens_identical']!s:>12} {r['max_abs_logit_diff']:12.2e} "
            f"{r['xla']['decode_tok_per_s']:10.1f} {r[kernel_impl]['decode_tok_per_s']:12.1f}"
        )


if __name__ == "__main__":
    main()
