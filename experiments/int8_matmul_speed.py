"""How fast XLA's CPU backend multiplies SmolLM2-135M's weights, by data type and rows per product: the
measurement behind the integer inference path's backend choice (issue 20).

One jitted function runs the 7 products of each of SmolLM2's 30 layers (q, k, v, o, gate, up, down;
every layer its own weights, chained so nothing is skipped), for 1-16 rows:
  float32    x @ w
  w8a8       x rounded per row to int8 (dynamic absmax scale), int8 x int8 -> int32 `lax.dot_general`,
             rescaled by the row scale and the per-output-channel weight scale
  w8a8_nk    the same with the codes stored transposed, [N, K] (each output channel's K codes contiguous)
  w8a8_kernel the w8a8 product through the compiled AVX2 kernel (`pallas_kernels.cpu_int8_dot`), and
  w8a8_pad   XLA's integer dot with a single row padded to two, as the library runs it without the kernel
  w8a8_blocked the kernel on the codes in its blocked layout (`cpu_int8_dot.block_weights`: each 32-column
             block one contiguous stream), as `converters.load` gives W8A8 models where the kernel runs
  w8_convert weight-only int8, converted to float32 inside the product
  bfloat16   x and w in bfloat16, float32 accumulation
and, apart, the tied lm_head (49152 x 576) in float32 and w8a8. Medians of --repeats calls after a warm-up;
ratios are float32 time / variant time, measured side by side in one process. The JSON records the CPU
model and its int8-dot / bfloat16 flags (ssm_llm.cpu_features): integer products are only fast on CPUs
with dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX).

    python experiments/int8_matmul_speed.py            # ~3 min on 2 cores
    python experiments/int8_matmul_speed.py --layers 2 --rows 1 2 --repeats 3   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_int8_dot
from pallas_kernels.quantized_matmul import quantize_weights
from ssm_llm.cpu_features import host_cpu
from ssm_llm.models.lm_head import _cpu_int8_dot as cpu_int8_dot_xla

HIDDEN, INTERMEDIATE, KV_WIDTH, VOCAB = 576, 1536, 192, 49152  # SmolLM2-135M (9 heads, 3 KV heads of 64)
LAYER_SHAPES = {  # name: (K, N) of x [rows, K] @ w [K, N]
    "q": (HIDDEN, HIDDEN),
    "k": (HIDDEN, KV_WIDTH),
    "v": (HIDDEN, KV_WIDTH),
    "o": (HIDDEN, HIDDEN),
    "gate": (HIDDEN, INTERMEDIATE),
    "up": (HIDDEN, INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
}
VARIANTS = ("float32", "w8a8", "w8a8_nk", "w8a8_pad", "w8a8_kernel", "w8a8_blocked", "w8_convert", "bfloat16")
OUT = Path(__file__).parent / "results" / "int8_matmul_speed.json"


def quantize_weight(w):
    """float32 [K, N] -> (int8 codes [K, N], float32 per-output-channel scales [N]): the library's
    symmetric absmax quantization with one group spanning K."""
    qw = quantize_weights(jnp.asarray(w, jnp.float32), bits=8, group_size=w.shape[0])
    return qw.values, qw.scales[0]


def padded_dot(xq, codes):
    """XLA's integer dot with one row padded to two (its one-row path is slow): the library's own XLA path."""
    return cpu_int8_dot_xla(xq, codes, "xla")


def w8a8_product(x, codes, scale, codes_axis: int = 0, dot=None):
    """x float32 [rows, K] -> x @ (codes * scale) with x rounded per row to int8: one integer product;
    `codes_axis`: the axis of `codes` that is K (0: [K, N], 1: [N, K]); `dot(xq, codes)`: another integer dot."""
    x_scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-12) / 127.0
    xq = jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8)
    if dot is not None:
        acc = dot(xq, codes)
    else:
        acc = jax.lax.dot_general(xq, codes, (((1,), (codes_axis,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scale * scale


def product(variant: str, x, weight):
    """One product of `variant`; `weight` is that variant's stored form of one [K, N] matrix."""
    if variant == "float32":
        return x @ weight
    if variant == "w8a8":
        return w8a8_product(x, *weight)
    if variant == "w8a8_nk":
        return w8a8_product(x, *weight, codes_axis=1)
    if variant == "w8a8_pad":
        return w8a8_product(x, *weight, dot=padded_dot)
    if variant == "w8a8_kernel":
        return w8a8_product(x, *weight, dot=cpu_int8_dot.int8_dot)
    if variant == "w8a8_blocked":
        blocked, scale = weight
        return w8a8_product(x, blocked, scale, dot=lambda xq, b: cpu_int8_dot.int8_dot_blocked(xq, b, scale.shape[-1]))
    if variant == "w8_convert":
        codes, scale = weight
        return (x @ codes.astype(jnp.float32)) * scale
    if variant == "bfloat16":
        return jnp.matmul(x.astype(jnp.bfloat16), weight, preferred_element_type=jnp.float32)
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def stored(variant: str, w: np.ndarray):
    """The device form of float32 weight `w` for `variant`."""
    if variant == "float32":
        return jnp.asarray(w)
    if variant == "bfloat16":
        return jnp.asarray(w, jnp.bfloat16)
    codes, scale = quantize_weight(w)
    if variant == "w8a8_blocked":
        return cpu_int8_dot.block_weights(codes), scale
    return (codes.T.copy(), scale) if variant == "w8a8_nk" else (codes, scale)


def layers_fn(variant: str):
    """A jitted x [rows, HIDDEN] -> x through every layer's 7 products of `variant`."""

    def run(x, layers):
        for w in layers:
            q, k, v = (product(variant, x, w[n]) for n in ("q", "k", "v"))
            o = product(variant, q, w["o"])
            d = product(variant, jax.nn.silu(product(variant, x, w["gate"])) * product(variant, x, w["up"]), w["down"])
            x = x + 1e-3 * (o + d) + 1e-6 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
        return x

    return jax.jit(run)


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall milliseconds of `fn(*args)` over `repeats` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    """Measure, print a table, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--skip-lm-head", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or min(args.rows) < 1:
        parser.error("--layers, --repeats and every --rows must be >= 1")

    rng = np.random.default_rng(0)
    weights = [
        {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in LAYER_SHAPES.items()}
        for _ in range(args.layers)
    ]
    for variant in {"w8a8_kernel", "w8a8_blocked"} & set(args.variants):
        if not cpu_int8_dot.available():
            parser.error(f"{variant}: {cpu_int8_dot.unavailable_reason()}")
    layers_ms = {}
    for variant in args.variants:
        layers = [{n: stored(variant, w) for n, w in layer.items()} for layer in weights]
        fn = layers_fn(variant)
        layers_ms[variant] = {}
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, HIDDEN)), jnp.float32)
            layers_ms[variant][rows] = median_ms(fn, x, layers, repeats=args.repeats)
            print(f"{variant:>10} rows={rows:<3d} {layers_ms[variant][rows]:8.2f} ms", file=sys.stderr, flush=True)
        del layers
    head_ms = {}
    if not args.skip_lm_head:
        embed = (0.05 * rng.standard_normal((HIDDEN, VOCAB))).astype(np.float32)
        for variant in ("float32", "w8a8", "w8a8_nk", "w8a8_pad", "w8a8_kernel", "w8a8_blocked"):
            head = stored(variant, embed)
            fn = jax.jit(lambda x, w, v=variant: product(v, x, w))
            head_ms[variant] = {
                rows: median_ms(fn, jnp.ones((rows, HIDDEN), jnp.float32), head, repeats=args.repeats)
                for rows in (1, 2)
            }
    result = {
        "machine": {**host_cpu().as_json(), "cores": os.cpu_count(), "jax": jax.__version__},
        "layers": args.layers,
        "products_per_call": 7 * args.layers,
        "repeats": args.repeats,
        "layers_ms": layers_ms,
        "speedup_vs_float32": {
            v: {r: layers_ms["float32"][r] / ms for r, ms in per.items()}
            for v, per in layers_ms.items()
            if "float32" in layers_ms
        },
        "lm_head_ms": head_ms,
        "command": "python experiments/int8_matmul_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    header = "rows".ljust(12) + "".join(f"{r:>9d}" for r in args.rows)
    print(f"{result['machine']['cpu']} (int8 dot: {result['machine']['int8_dot'] or 'none'}), ms per call")
    print(header)
    for variant, per in layers_ms.items():
        print(variant.ljust(12) + "".join(f"{per[r]:9.2f}" for r in args.rows))
    for variant, per in head_ms.items():
        print(f"lm_head {variant}: " + ", ".join(f"{r} rows {ms:.2f} ms" for r, ms in per.items()))
    return result


if __name__ == "__main__":
    main()
