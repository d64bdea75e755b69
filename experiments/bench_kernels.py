"""Pallas kernels vs their XLA references (and cuDNN attention) on a GPU, with achieved bandwidth / FLOP/s.

Every kernel of `pallas_kernels` is timed on realistic shapes (SmolLM2-135M, Llama-3-8B-like GQA,
Mamba-1.4B / Mamba-2-2.7B-like SSM layers) twice: compiled Pallas (`impl="pallas"`) and the pure-jnp
reference compiled by XLA (`impl="xla"`); attention also against `jax.nn.dot_product_attention(...,
implementation="cudnn")`. Each case reports its minimum bytes (every input read once, every output
written once) and FLOPs, so a time gives achieved GB/s and TFLOP/s; these are compared with ceilings
measured at the start on the same device (a large device-to-device copy; a large bf16 matmul), as
`fraction of peak`. Both implementations' outputs are checked against each other before timing.

Timing: each jitted call is warmed up, then run in batches of back-to-back calls (asynchronous
dispatch keeps the GPU busy) cycling over several input sets so small cases are not served from L2;
the median batch time per call is reported. A case whose kernel fails to compile, run or match its
reference records the error and the run goes on. Targets (issue 27, H200): decode attention >= 70% of
the measured copy bandwidth at batch 8, 4k context; prefill flash >= 0.7x cuDNN on Llama-3-8B shapes;
SSD chunked scan and selective scan faster than XLA; int8 / int4 matmuls >= 60% of bandwidth at batch 1.

    python experiments/bench_kernels.py             # on a GPU: all cases -> results/bench_kernels.json (+ .png)
    python experiments/bench_kernels.py --out DIR   # ... into DIR instead
    python experiments/bench_kernels.py --quick     # anywhere: tiny shapes, interpret mode on CPU (a smoke
                                                    # run of this harness; its times mean nothing)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pallas_kernels.block_sparse_attention import BlockSparseBlockSizes, block_sparse_attention
from pallas_kernels.cache_attention import CacheAttentionBlockSizes, cache_attention
from pallas_kernels.causal_conv1d import (
    CausalConv1dBlockSizes,
    CausalConv1dUpdateBlockSizes,
    causal_conv1d,
    causal_conv1d_update,
)
from pallas_kernels.flash_attention import FlashAttentionBlockSizes, flash_attention
from pallas_kernels.quantized_matmul import (
    QuantizedMatmulBlockSizes,
    quantize_weights,
    quantized_matmul,
    quantized_matmul_int8,
)
from pallas_kernels.selective_scan import (
    SelectiveScanBlockSizes,
    SelectiveStateUpdateBlockSizes,
    selective_scan,
    selective_state_update,
)
from pallas_kernels.ssd import SSDChunkedBlockSizes, ssd_chunked, ssd_step
from pallas_kernels.tree_attention import tree_attention

RESULTS = Path(__file__).parent / "results"
SEED = 0


# The GPU (Triton) kernels' block sizes by kernel name (ssd_step has none), for `--block-sizes`.
BLOCK_SIZES = {
    "flash_attention": FlashAttentionBlockSizes,
    "block_sparse_attention": BlockSparseBlockSizes,
    "cache_attention": CacheAttentionBlockSizes,
    "tree_attention": CacheAttentionBlockSizes,
    "selective_scan": SelectiveScanBlockSizes,
    "selective_state_update": SelectiveStateUpdateBlockSizes,
    "ssd_chunked": SSDChunkedBlockSizes,
    "causal_conv1d": CausalConv1dBlockSizes,
    "causal_conv1d_update": CausalConv1dUpdateBlockSizes,
    "quantized_matmul": QuantizedMatmulBlockSizes,
    "quantized_matmul_int8": QuantizedMatmulBlockSizes,
}


# `--sweep`: other block sizes for the cases whose name starts with the key, each timed as a case of its own.
SWEEP = {
    "flash prefill llama3-8b b4": [
        {"block_q": 128, "block_k": 64},
        {"block_q": 64, "block_k": 128},
        {"block_q": 128, "block_k": 128, "num_warps": 8},
        {"num_stages": 3},
        {"num_stages": 4},
        {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
    ],
    "decode attention bf16 b8 s4096": [
        {"block_k": 128},
        {"block_k": 256},
        {"block_k": 256, "num_warps": 8},
        {"block_k": 512, "num_warps": 8},
        {"block_k": 256, "num_warps": 8, "num_stages": 3},
        {"block_k": 256, "num_warps": 8, "target_programs": 528},
    ],
    "tree attention": [{"block_k": 256, "num_warps": 8}],
    "ssd chunked": [{"chunk": 128}, {"block_p": 64}, {"block_p": 16}, {"num_warps": 4}],
    "selective scan": [{"block_d": 64}, {"block_t": 32}, {"block_d": 16}, {"block_d": 16, "num_warps": 2}],
    "int4 matmul m1": [{"block_n": 128}, {"block_k": 512}],
    "int8 matmul m1": [{"block_n": 128}],
}


def sweep_cases(cases: list) -> list:
    """Copies of the cases named in SWEEP with each of their other block sizes."""
    extra = []
    for case in cases:
        for prefix, variants in SWEEP.items():
            if case.name.startswith(prefix):
                for fields in variants:
                    label = ",".join(f"{k}={v}" for k, v in fields.items())
                    blocks = BLOCK_SIZES[case.kernel](**fields)
                    extra.append(dataclasses.replace(case, name=f"{case.name} [{label}]", blocks=blocks, results={}))
    return extra


def parse_block_sizes(specs: list[str]) -> dict:
    """`KERNEL:FIELD=INT,FIELD=INT` strings -> {kernel: its block sizes, defaults for the fields not named}."""
    chosen = {}
    for spec in specs:
        kernel, _, fields = spec.partition(":")
        if kernel not in BLOCK_SIZES:
            raise ValueError(
                f"--block-sizes {spec!r}: unknown kernel {kernel!r}; expected one of {sorted(BLOCK_SIZES)}"
            )
        try:
            values = {name: int(value) for name, value in (item.split("=") for item in fields.split(",") if item)}
            chosen[kernel] = BLOCK_SIZES[kernel](**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--block-sizes {spec!r}: {err}") from None
    return chosen


@dataclass
class Case:
    """One kernel on one shape: `make(key)` builds an input tuple; `run(kw)` returns the function of those
    inputs for the dispatcher keyword arguments `kw` (impl, block_sizes); bytes/flops are the minimum
    traffic and arithmetic."""

    name: str
    kernel: str
    make: Callable
    run: Callable[[dict], Callable]
    bytes: float
    flops: float
    cudnn: Callable | None = None
    tol: float = 2e-2
    blocks: object = None  # the kernel's block sizes for this case (None: --block-sizes or the defaults)
    results: dict = field(default_factory=dict)


def _n(key, shape, dtype=jnp.bfloat16, scale=1.0):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


def _size(*arrays) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def attention_cases(quick: bool) -> list[Case]:
    cases = []
    # Prefill flash attention: Llama-3-8B-like GQA (32 q / 8 kv heads of 128) and SmolLM2 (9 / 3 of 64).
    shapes = (
        [("llama3-8b", 1, 64, 4, 2, 16, jnp.bfloat16), ("tiny f32", 1, 40, 4, 2, 16, jnp.float32)]
        if quick
        else [
            ("llama3-8b", 4, 2048, 32, 8, 128, jnp.bfloat16),
            ("smollm2", 8, 1024, 9, 3, 64, jnp.bfloat16),
            ("smollm2 f32", 8, 1024, 9, 3, 64, jnp.float32),
        ]
    )
    for label, b, t, h, hk, d, dtype in shapes:

        def make(key, b=b, t=t, h=h, hk=hk, d=d, dtype=dtype):
            k = jax.random.split(key, 3)
            return _n(k[0], (b, t, h, d), dtype), _n(k[1], (b, t, hk, d), dtype), _n(k[2], (b, t, hk, d), dtype)

        cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
        cases.append(
            Case(
                f"flash prefill {label} b{b} t{t}",
                "flash_attention",
                make,
                lambda kw: lambda q, k, v: flash_attention(q, k, v, **kw),
                bytes=jnp.dtype(dtype).itemsize * (2 * b * t * h * d + 2 * b * t * hk * d),
                flops=2 * b * h * t * t * d,
                cudnn=cudnn if dtype == jnp.bfloat16 else None,
            )
        )
    # MInference's sparse prefill at SmolLM2's full context: each query block attends to its 8 nearest key blocks
    # of 64 and the first 256 keys (A-shape indices, the same work as vertical-slash's); cuDNN: dense causal.
    b, t, h, hk, d, block, width, cols = (1, 100, 4, 2, 16, 16, 2, 8) if quick else (1, 8192, 9, 3, 64, 64, 8, 256)
    n_blocks = -(-t // block)
    sparse_blocks = jnp.broadcast_to(jnp.arange(n_blocks)[:, None] - jnp.arange(width), (b, h, n_blocks, width))
    sparse_columns = jnp.broadcast_to(jnp.arange(cols), (b, h, cols))

    def make_sparse(key, b=b, t=t, h=h, hk=hk, d=d):  # bound now: the decode cases below reuse these names
        k = jax.random.split(key, 3)
        qkv = _n(k[0], (b, t, h, d)), _n(k[1], (b, t, hk, d)), _n(k[2], (b, t, hk, d))
        return (*qkv, sparse_blocks.astype(jnp.int32), sparse_columns.astype(jnp.int32))

    cases.append(
        Case(
            f"block-sparse prefill smollm2 b{b} t{t} ({width} blocks + {cols} columns)",
            "block_sparse_attention",
            make_sparse,
            lambda kw, block=block: (
                lambda q, k, v, blocks, columns: block_sparse_attention(q, k, v, blocks, columns, block=block, **kw)
            ),
            bytes=2 * (2 * b * t * h * d + 2 * b * t * hk * d),
            flops=4 * b * h * t * (width * block + cols) * d,
            cudnn=lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        )
    )
    # Decode (one token) against a cache: 4k context at batch 8 (the target) and 16, bf16, int8
    # K/V and float32; one 32k-token cache at batch 1.
    h, hk, d = (4, 2, 16) if quick else (32, 8, 128)
    decode_shapes = (
        [(2, 100, "bf16")]
        if quick
        else [(8, 4096, "bf16"), (16, 4096, "bf16"), (16, 4096, "int8"), (8, 4096, "f32"), (1, 32768, "bf16")]
    )
    for b, s, kind in decode_shapes:
        int8, dtype = kind == "int8", (jnp.float32 if kind == "f32" else jnp.bfloat16)

        def make(key, b=b, s=s, int8=int8, dtype=dtype):
            k = jax.random.split(key, 5)
            q = _n(k[0], (b, 1, h, d), dtype)
            lengths = jnp.full((b,), s, jnp.int32)
            if int8:
                kk, v = (jax.random.randint(key, (b, hk, s, d), -127, 128).astype(jnp.int8) for key in k[1:3])
                ks, vs = (0.01 * jnp.abs(jax.random.normal(key, (b, hk, s))) for key in k[3:])
                return q, kk, v, lengths, ks, vs
            return q, _n(k[1], (b, hk, s, d), dtype), _n(k[2], (b, hk, s, d), dtype), lengths, None, None

        def run(kw):
            return lambda q, k, v, n, ks, vs: cache_attention(q, k, v, n[:, None] - 1, n, 0, None, ks, vs, **kw)

        itemsize = 1 if int8 else jnp.dtype(dtype).itemsize
        cache_bytes = 2 * b * hk * s * d * itemsize + (2 * b * hk * s * 4 if int8 else 0)
        cudnn = (
            None
            if kind != "bf16"
            else (
                lambda q, k, v, n, ks, vs: jax.nn.dot_product_attention(
                    q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), key_value_seq_lengths=n, implementation="cudnn"
                )
            )
        )
        cases.append(
            Case(
                f"decode attention {kind} b{b} s{s}",
                "cache_attention",
                make,
                run,
                bytes=cache_bytes + 2 * jnp.dtype(dtype).itemsize * b * h * d,
                flops=4 * b * h * s * d,
                cudnn=cudnn,
            )
        )
    # Draft-tree verification: 16 draft tokens against a 4k prefix, batch 16.
    tq = 4 if quick else 16
    b, s = (2, 100) if quick else (16, 4096)

    def make_tree(key):
        k = jax.random.split(key, 4)
        mask = jax.random.bernoulli(k[3], 0.3, (b, tq, tq)) | jnp.eye(tq, dtype=bool)
        return (
            _n(k[0], (b, tq, h, d)),
            _n(k[1], (b, hk, s, d)),
            _n(k[2], (b, hk, s, d)),
            jnp.full((b,), s - tq, jnp.int32),
            mask,
        )

    cases.append(
        Case(
            f"tree attention t{tq} b{b} s{s}",
            "tree_attention",
            make_tree,
            lambda kw: lambda q, k, v, p, m: tree_attention(q, k, v, p, m, **kw),
            bytes=2 * b * hk * s * d * 2,
            flops=4 * b * h * tq * s * d,
        )
    )
    return cases


def ssm_cases(quick: bool) -> list[Case]:
    cases = []
    f32 = jnp.float32
    # Mamba-1.4B-like layer: d_inner 4096, N 16.
    b, t, dm, n = (1, 40, 48, 16) if quick else (2, 2048, 4096, 16)

    def make_scan(key):
        k = jax.random.split(key, 6)
        return (
            _n(k[0], (b, t, dm)),
            jax.nn.softplus(_n(k[1], (b, t, dm), f32) - 2).astype(jnp.bfloat16),
            -jnp.exp(_n(k[2], (dm, n), f32)),
            _n(k[3], (b, t, n)),
            _n(k[4], (b, t, n)),
            _n(k[5], (dm,), f32),
            _n(k[0], (b, t, dm)),
        )

    cases.append(
        Case(
            f"selective scan b{b} t{t} d{dm}",
            "selective_scan",
            make_scan,
            lambda kw: lambda *a: selective_scan(*a, **kw),
            bytes=2 * b * t * (4 * dm + 2 * n) + 4 * b * dm * n,
            flops=9 * b * t * dm * n,
        )
    )
    bs = 2 if quick else 16

    def make_update(key):
        k = jax.random.split(key, 6)
        return (
            _n(k[0], (bs, dm, n), f32),
            _n(k[1], (bs, dm)),
            jax.nn.softplus(_n(k[2], (bs, dm), f32)),
            -jnp.exp(_n(k[3], (dm, n), f32)),
            _n(k[4], (bs, n)),
            _n(k[5], (bs, n)),
            _n(k[0], (dm,), f32),
            _n(k[1], (bs, dm)),
        )

    cases.append(
        Case(
            f"selective state update b{bs} d{dm}",
            "selective_state_update",
            make_update,
            lambda kw: lambda *a: selective_state_update(*a, **kw),
            bytes=2 * 4 * bs * dm * n + 4 * dm * n,
            flops=7 * bs * dm * n,
        )
    )
    # Mamba-2-2.7B-like layer: 80 heads of 64, N 128, one group.
    b, t, h, p, n = (1, 70, 2, 16, 16) if quick else (2, 4096, 80, 64, 128)

    def make_ssd(key):
        k = jax.random.split(key, 6)
        return (
            _n(k[0], (b, t, h, p)),
            jax.nn.softplus(_n(k[1], (b, t, h), f32) - 2),
            -jnp.exp(_n(k[2], (h,), f32)),
            _n(k[3], (b, t, 1, n)),
            _n(k[4], (b, t, 1, n)),
            _n(k[5], (h,), f32),
        )

    chunk = 256
    cases.append(
        Case(
            f"ssd chunked b{b} t{t} h{h}",
            "ssd_chunked",
            make_ssd,
            lambda kw: lambda *a: ssd_chunked(*a, chunk_size=chunk, **kw),
            bytes=2 * 2 * b * t * h * p + 2 * 2 * b * t * n + 4 * b * h * p * n,
            flops=2 * b * t * h * (chunk * (n + p) + 2 * p * n),
        )
    )

    def make_step(key):
        k = jax.random.split(key, 6)
        return (
            _n(k[0], (bs, h, p, n), f32),
            _n(k[1], (bs, h, p)),
            jax.nn.softplus(_n(k[2], (bs, h), f32)),
            -jnp.exp(_n(k[3], (h,), f32)),
            _n(k[4], (bs, 1, n)),
            _n(k[5], (bs, 1, n)),
            _n(k[0], (h,), f32),
        )

    cases.append(
        Case(
            f"ssd step b{bs} h{h}",
            "ssd_step",
            make_step,
            lambda kw: lambda *a: ssd_step(*a, **kw),
            bytes=2 * 4 * bs * h * p * n,
            flops=6 * bs * h * p * n,
        )
    )
    # The short conv of that Mamba-2 layer: conv_dim = 2 * 2560 + 2 * 128 = 5376 channels, 4 taps.
    c = 24 if quick else 5376

    def make_conv(key):
        k = jax.random.split(key, 3)
        return _n(k[0], (b, t, c)), _n(k[1], (c, 4), f32), _n(k[2], (c,), f32)

    cases.append(
        Case(
            f"causal conv1d b{b} t{t} c{c}",
            "causal_conv1d",
            make_conv,
            lambda kw: lambda x, w, bias: causal_conv1d(x, w, bias, **kw),
            bytes=2 * 2 * b * t * c,
            flops=2 * 4 * b * t * c,
        )
    )

    def make_conv_update(key):
        k = jax.random.split(key, 4)
        return _n(k[0], (bs, c)), _n(k[1], (c, 4), f32), _n(k[2], (c,), f32), _n(k[3], (bs, c, 3))

    cases.append(
        Case(
            f"causal conv1d update b{bs} c{c}",
            "causal_conv1d_update",
            make_conv_update,
            lambda kw: lambda x, w, bias, s: causal_conv1d_update(x, w, bias, s, **kw),
            bytes=2 * bs * c * (2 + 2 * 3),
            flops=2 * 4 * bs * c,
        )
    )
    return cases


def matmul_cases(quick: bool) -> list[Case]:
    cases = []
    k_dim, n_dim = (128, 96) if quick else (4096, 11008)  # Llama-7B's MLP up-projection
    for bits in (8, 4):
        for m in (1,) if quick else (1, 16):

            def make(key, m=m, bits=bits):
                k = jax.random.split(key)
                return _n(k[0], (m, k_dim)), quantize_weights(_n(k[1], (k_dim, n_dim), scale=0.02), bits, 128)

            weight_bytes = k_dim * n_dim * bits // 8 + (k_dim // 128) * n_dim * 4
            cases.append(
                Case(
                    f"int{bits} matmul m{m} {k_dim}x{n_dim}",
                    "quantized_matmul",
                    make,
                    lambda kw: lambda x, w: quantized_matmul(x, w, **kw),
                    bytes=weight_bytes + 2 * m * (k_dim + n_dim),
                    flops=2 * m * k_dim * n_dim,
                )
            )
    # Quamba2's W8A8 / W4A8: int8 activation codes with a per-tensor scale, integer accumulation; groups of
    # 128 and per-channel weights (one group of all K rows), float32 output.
    for bits in (8, 4):
        for group in sorted({128, k_dim}):
            for m in (1,) if quick else (1, 16):

                def make(key, m=m, bits=bits, group=group):
                    k = jax.random.split(key)
                    xq = jax.random.randint(k[0], (m, k_dim), -127, 128, dtype=jnp.int8)
                    return xq, jnp.float32(0.01), quantize_weights(_n(k[1], (k_dim, n_dim), scale=0.02), bits, group)

                weight_bytes = k_dim * n_dim * bits // 8 + (k_dim // group) * n_dim * 4
                label = "per-channel" if group == k_dim else f"g{group}"
                cases.append(
                    Case(
                        f"w{bits}a8 matmul m{m} {label} {k_dim}x{n_dim}",
                        "quantized_matmul_int8",
                        make,
                        lambda kw: lambda xq, s, w: quantized_matmul_int8(xq, s, w, **kw),
                        bytes=weight_bytes + m * k_dim + 4 * m * n_dim,
                        flops=2 * m * k_dim * n_dim,
                    )
                )
    return cases


def time_call(fn, input_sets, batches: int, per_batch: int) -> float:
    """Median seconds per call of jitted `fn`, cycling over `input_sets` (warm-up first)."""
    jax.block_until_ready(fn(*input_sets[0]))
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        outs = [fn(*input_sets[i % len(input_sets)]) for i in range(per_batch)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / per_batch)
    return statistics.median(times)


def ceilings(quick: bool) -> dict:
    """Measured device ceilings: copy bandwidth (bytes read + written) and bf16 matmul FLOP/s, and the
    harness's own floor per call."""
    n = 1 << (20 if quick else 28)
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    t_copy = time_call(copy, [(x,)], 5, 5)
    size = 256 if quick else 8192
    a = _n(jax.random.PRNGKey(1), (size, size))
    matmul = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t_mm = time_call(matmul, [(a,)], 5, 5)
    # The harness's floor: a jitted call that does almost nothing, timed the same way (cases near it are
    # bound by dispatch, not by the kernel).
    tiny = jax.jit(lambda a: a + 1.0)
    t_tiny = time_call(tiny, [(jnp.ones(16),)], 10, 20)
    return {
        "copy_GBps": 2 * 4 * n / t_copy / 1e9,
        "bf16_matmul_TFLOPs": 2 * size**3 / t_mm / 1e12,
        "dispatch_floor_us": t_tiny * 1e6,
    }


def check_outputs(got, want, tol: float) -> float:
    """Relative L2 error of `got` vs `want` (pytrees); raises if over `tol` or not finite."""
    errs = []
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if not np.isfinite(g).all():
            raise AssertionError("non-finite kernel output")
        errs.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)))
    err = max(errs)
    if err > tol:
        raise AssertionError(f"kernel differs from reference: relative error {err:.2e} > {tol}")
    return err


def measure(case, chosen_blocks, kernel_impl, on_gpu, input_sets, batches, per_batch, peak) -> None:
    """Check the Pallas kernel of `case` against its reference, then time it, the reference and cuDNN, into
    `case.results`. A kernel that fails to compile or run, or differs from the reference, is recorded
    (`error`, with the relative error where there is one) and not timed."""
    keys = jax.random.split(jax.random.PRNGKey(SEED), input_sets)
    inputs = [case.make(k) for k in keys]
    blocks = (
        case.blocks
        or chosen_blocks.get(case.kernel)
        or (BLOCK_SIZES[case.kernel]() if case.kernel in BLOCK_SIZES else None)
    )
    kernel_kw = {"impl": kernel_impl} if blocks is None else {"impl": kernel_impl, "block_sizes": blocks}
    case.results["block_sizes"] = None if blocks is None else dataclasses.asdict(blocks)
    fns = {"pallas": jax.jit(case.run(kernel_kw)), "xla": jax.jit(case.run({"impl": "xla"}))}
    if case.cudnn is not None and on_gpu:
        fns["cudnn"] = jax.jit(case.cudnn)
    try:
        want = fns["xla"](*inputs[0])
        case.results["rel_err_vs_xla"] = check_outputs(fns["pallas"](*inputs[0]), want, case.tol)
    except Exception as err:  # a first contact with a compiler: record what broke and go on
        case.results["error"] = f"{type(err).__name__}: {str(err)[:1500]}"
        return
    for label, fn in fns.items():
        try:
            seconds = time_call(fn, inputs, batches, per_batch)
        except Exception as err:  # cuDNN may not support a shape: record why, keep going
            case.results[label] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        case.results[label] = {
            "us": seconds * 1e6,
            "GBps": case.bytes / seconds / 1e9,
            "TFLOPs": case.flops / seconds / 1e12,
        }
    ours = case.results["pallas"]
    if "us" not in ours:
        return
    ours["bandwidth_fraction"] = ours["GBps"] / peak["copy_GBps"]
    ours["flops_fraction"] = ours["TFLOPs"] / peak["bf16_matmul_TFLOPs"]
    for peer in ("xla", "cudnn"):
        if "us" in case.results.get(peer, {}):
            ours[f"speedup_vs_{peer}"] = case.results[peer]["us"] / ours["us"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (interpret mode on CPU): a smoke run")
    parser.add_argument(
        "--only", default="", help="run only cases whose name contains this text (alternatives separated by '|')"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the plot")
    parser.add_argument("--sweep", action="store_true", help="also time the other block sizes listed in SWEEP")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--per-batch", type=int, default=20)
    parser.add_argument("--input-sets", type=int, default=4, help="input sets cycled through (defeats L2 reuse)")
    parser.add_argument(
        "--block-sizes",
        action="append",
        default=[],
        metavar="KERNEL:FIELD=INT,...",
        help="the Pallas kernel's block sizes instead of its defaults, e.g. "
        "'ssd_chunked:chunk=128,block_p=64' (repeatable; fields of the kernel's ...BlockSizes)",
    )
    args = parser.parse_args()
    try:
        chosen_blocks = parse_block_sizes(args.block_sizes)
    except ValueError as err:
        parser.error(str(err))
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        parser.error("the compiled Pallas kernels need a GPU (this is a CPU); use --quick for a smoke run")
    kernel_impl = "pallas" if on_gpu else "interpret"
    batches, per_batch = (2, 2) if args.quick else (args.batches, args.per_batch)
    device = jax.devices()[0]
    peak = ceilings(args.quick)
    cases = [
        c
        for c in attention_cases(args.quick) + ssm_cases(args.quick) + matmul_cases(args.quick)
        if any(part in c.name for part in args.only.split("|"))
    ]
    if args.sweep:
        cases += sweep_cases(cases)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_kernels_quick" if args.quick else "bench_kernels"
    report = {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "kernel_impl": kernel_impl,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "measured_ceilings": peak,
        "cases": [],
    }
    for case in tqdm(cases, desc="kernels"):
        measure(case, chosen_blocks, kernel_impl, on_gpu, args.input_sets, batches, per_batch, peak)
        report["cases"].append(
            {"name": case.name, "kernel": case.kernel, "bytes": case.bytes, "flops": case.flops, **case.results}
        )
        # Written after each case, so a run stopped by a timeout keeps what it measured.
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{stem}.png")
    print(
        f"\n{device.device_kind}: copy {peak['copy_GBps']:.0f} GB/s, "
        f"bf16 matmul {peak['bf16_matmul_TFLOPs']:.0f} TFLOP/s, a near-empty jitted call "
        f"{peak['dispatch_floor_us']:.0f} us (measured); Pallas impl = {kernel_impl}"
    )
    print(f"{'case':44} {'pallas us':>10} {'xla x':>7} {'cudnn x':>8} {'GB/s':>8} {'%bw':>5} {'TFLOP/s':>8} {'%mm':>5}")
    for c in report["cases"]:
        ours = c.get("pallas", {})
        if "us" not in ours:
            print(f"{c['name']:44} FAILED: {(c.get('error') or ours.get('error', ''))[:150]}")
            continue
        print(
            f"{c['name']:44} {ours['us']:10.1f} {ours.get('speedup_vs_xla', float('nan')):7.2f} "
            f"{ours.get('speedup_vs_cudnn', float('nan')):8.2f} {ours['GBps']:8.0f} "
            f"{100 * ours['bandwidth_fraction']:5.0f} {ours['TFLOPs']:8.1f} {100 * ours['flops_fraction']:5.0f}"
        )


def plot(report: dict, path: Path) -> None:
    """Bar chart: speed-up of each Pallas kernel over its XLA reference (and cuDNN where timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["name"] for c in report["cases"]]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(
        y - 0.2, [c.get("pallas", {}).get("speedup_vs_xla", 0) for c in report["cases"]], 0.4, label="vs XLA reference"
    )
    ax.barh(y + 0.2, [c.get("pallas", {}).get("speedup_vs_cudnn", 0) for c in report["cases"]], 0.4, label="vs cuDNN")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xlabel("speed-up of the Pallas kernel (x)")
    ax.set_title(f"pallas_kernels on {report['device']} ({report['kernel_impl']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
