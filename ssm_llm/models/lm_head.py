"""Pieces every model family shares: biased linear layers (float or quantized weights) and the output
projection to the vocabulary."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_int8_dot
from pallas_kernels.cpu_int8_dot import BlockedInt8Weight
from pallas_kernels.dfloat11 import DFloat11Weight, decompress, take_rows
from pallas_kernels.quantized_matmul import QuantizedWeight, quantized_matmul, quantized_matmul_int8
from pallas_kernels.quantized_matmul.weights import unpack_int4
from ssm_llm.bitstack_weight import BitStackWeight, reconstruct
from ssm_llm.hadamard import block_hadamard

# On CPU, up to this many rows (batch x tokens), tied logits are computed as `embed @ h.T` ([V, rows])
# and transposed back: XLA then streams the [V, H] embedding once like a matrix-vector product instead
# of packing it for a GEMM. Measured on SmolLM2 (576 x 49152, 2-core CPU): 1.7-1.9x faster for 2-16
# rows, equal at 1 row, slower from ~128 rows (prefill) on. Other backends keep `h @ embed.T`.
SMALL_ROWS = 32
# W8A8 products of up to this many rows run through the compiled CPU kernel (`pallas_kernels.cpu_int8_dot`) when
# the config's `int8_dot` is "auto". Measured on the 2-core AVX-512 VNNI EPYC (README, "A compiled CPU kernel"):
# SmolLM2's 210 layer products (experiments/int8_matmul_speed.py) 11.1 vs 20.0 ms at 1 row, 15.3 vs 14.9 at 2,
# 17.1 vs 18.7 at 4; W8A8 decode (bench_decode.py --xla-int8-dot, two runs) 1.07-1.35x at batch 1 (one 0.89x),
# 0.93-1.16x at batch 2, and 0.80x at batch 4 (120 vs 150 tok/s). Two rows is the last size where it did not lose.
KERNEL_ROWS = 2
# How many int8 terms an int8 output projection (`quantize_weights(..., embedding=True)`) rounds its input in
# (`int8_matmul(..., terms=)`). Two were measured on SmolLM2 W8A8 rotated, the 2-core VNNI EPYC: the model's KL to
# float32 0.0040 instead of 0.0045 (a float head: 0.0033) and greedy tokens equal to float32's 0.704 instead of
# 0.632 (experiments/quantization_eval.py, results/quantization_eval_head_{one_term,two_terms}.json), but decode at
# batch 16 at 0.82x (twice the head's rows; batch 1 unchanged: results/bench_head_terms.json). That would take
# batch-16 W8A8 from ~3.0x to ~2.5x float32, for an agreement still far from 90%: one term stays.
HEAD_TERMS = 1
# A head residual (`config.head_residual`) holds W - s q (the int8 head's rounding error, |.| <= s / 2) in 4 bits on
# a grid of s / HEAD_RESIDUAL_STEPS: codes in [-7, 7], no clipping, so every weight is within s / 28 of W, against
# s / 2 for the int8 codes alone.
HEAD_RESIDUAL_STEPS = 14
# How many top int8 logits of each row `refine_logits` recomputes. Measured on SmolLM2 W8A8 rotated, 2048 held-out
# positions of the quantized model's own final hidden states: the float head's top token was the int8 head's top 1
# at 98.1% of them, among its top 2 at 99.9%, its top 3 at all; 8 leaves room. Refined, the top token was the float
# head's at 99.9% (one more bit everywhere would not be free: a second full int8 product cost 0.82x decode at batch
# 16, see HEAD_TERMS). experiments/head_candidates.py, results/head_candidates.json.
HEAD_CANDIDATES = 8
# `_top_columns` finds them among the maxima of blocks of this many logits first: on SmolLM2's 49152 logits (2-core
# EPYC) 0.17 against `jax.lax.top_k`'s 0.91 ms at 16 rows, 0.10 against 0.52 at 9, equal at 1 (blocks of 64: 0.13
# at 16 rows, 256: 0.16, 512: 0.22).
_TOP_BLOCK = 128
# Rows of the refined product per int32 sum: |x code| <= 127 times |weight code| <= 127 * 14 + 7 = 1785 stays under
# 2^31 for up to 9472 of them.
_REFINE_CHUNK = 8192


def linear(
    x: jax.Array,
    w,
    b: jax.Array | None = None,
    int8_acts: bool = False,
    rotate: bool = False,
    int8_dot: str = "auto",
    terms: int = 1,
) -> jax.Array:
    """`x: [..., in] @ w: [in, out] (+ b: [out])`. A `QuantizedWeight` w multiplies through the quantized
    matmul: with float x (weight-only), or with `int8_acts` through `int8_matmul` (W8A8 with `terms` int8
    roundings of x, its CPU products as `int8_dot` says), x first rotated by `block_hadamard` if `rotate` (w then
    holds the rotated rows). A `BitStackWeight` is rebuilt from its packed blocks inside the product's program; a
    `BlockedInt8Weight` (the CPU kernel's layout of a W8A8 weight) multiplies as W8A8 only."""
    if isinstance(w, BitStackWeight):
        w = reconstruct(w, x.dtype)
    if isinstance(w, BlockedInt8Weight) and not int8_acts:
        raise ValueError("linear: a BlockedInt8Weight multiplies int8 activations only (int8_acts=True)")
    if isinstance(w, (QuantizedWeight, BlockedInt8Weight)):
        if int8_acts and rotate:
            x = block_hadamard(x).astype(x.dtype)
        y = int8_matmul(x, w, int8_dot, terms) if int8_acts else quantized_matmul(x, w).astype(x.dtype)
    else:
        y = x @ w
    return y if b is None else y + b


def int8_matmul(
    x: jax.Array, w: QuantizedWeight | BlockedInt8Weight, int8_dot: str = "auto", terms: int = 1
) -> jax.Array:
    """x: float [..., K] rounded to int8 with one absmax scale per row (dynamic, per token), times int8
    weight codes with int32 accumulation, rescaled: `x_scale[..., None] * sum_g (xq_g @ q_g) * scale_g`.
    With `terms=2` the rounding's residual is rounded to int8 too, on a grid 256 times finer (x ~ x_scale (q1 +
    q2 / 256)), and multiplied in the same int8 dot as twice the rows: each activation is then within x_scale / 256
    instead of x_scale / 2. An all-zero row has scale 0 and gives 0. Result in x's dtype. On CPU, per-channel 8-bit
    weights multiply as one int8 dot: the compiled kernel for few rows under `int8_dot="auto"` (see
    `_cpu_int8_dot`); a `BlockedInt8Weight` through `_blocked_int8_dot`."""
    if terms not in (1, 2):
        raise ValueError(f"int8_matmul: terms is 1 or 2 int8 roundings of the activations, got {terms!r}")
    # x materialised first: fused into its producer (silu(gate) * up, a norm), XLA's CPU code computed some
    # elements differently for one row than for several, and a rounding step then moved. Costs one small copy.
    x = jax.lax.optimization_barrier(x)
    x_scale, xq, rq = _int8_terms(x, terms)
    if terms == 1:
        return (_w8a8_codes_product(xq, w, int8_dot) * x_scale).astype(x.dtype)
    both = _w8a8_codes_product(jnp.stack([xq, rq]), w, int8_dot)
    return _two_terms_sum(both[0], both[1], x_scale).astype(x.dtype)


def _int8_terms(x: jax.Array, terms: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """x [..., K] as x_scale [..., 1] (absmax / 127, per row) and int8 codes: q1 = round(x / x_scale) and, for
    `terms=2`, q2 = round((x / x_scale - q1) * 256) (else None)."""
    xf = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    steps = xf / jnp.where(x_scale > 0, x_scale, 1.0)  # x in units of its int8 step
    xq = jnp.clip(jnp.round(steps), -127, 127).astype(jnp.int8)
    if terms == 1:
        return x_scale, xq, None
    # Every step below gives the same bits however XLA fuses it (a multiply-add contracted or not): steps - q1 is
    # exact (they are within 1/2 of each other), and the scalings by 256 and 1/256 are exact. With a second scale of
    # its own the residual's rounding and the terms' sum moved by an ulp between programs, and logits computed
    # twice inside one program could disagree (see `ssm_llm.sampling.greedy_tokens`).
    residual = (steps - xq.astype(jnp.float32)) * 256.0
    return x_scale, xq, jnp.clip(jnp.round(residual), -127, 127).astype(jnp.int8)


def _two_terms_sum(first: jax.Array, second: jax.Array, x_scale: jax.Array) -> jax.Array:
    """(first + second / 256) * x_scale in float32: the product by 1/256 is exact, so the sum has the same bits
    whether XLA contracts it into a multiply-add or not."""
    return (first.astype(jnp.float32) + second.astype(jnp.float32) * (1.0 / 256.0)) * x_scale


def refine_logits(
    logits: jax.Array,
    x: jax.Array,
    head: QuantizedWeight | BlockedInt8Weight,
    residual: QuantizedWeight,
    candidates: int = HEAD_CANDIDATES,
) -> jax.Array:
    """An int8 head's logits [..., V] with each row's top `candidates` recomputed on finer numbers: the head's
    weights as int8 codes plus their 4-bit rounding residual (`residual`: [H, V], scale s / HEAD_RESIDUAL_STEPS, so
    w = r (14 q + q_r)), its input x [..., H] (as the head multiplies it: rotated under `activation_rotation`) in
    two int8 terms (`int8_matmul(terms=2)`'s rounding). The sums are int32, exact in any program (over chunks of
    _REFINE_CHUNK hidden rows, added in a fixed order), so a token's logit has the same bits in a one-row step and
    a many-row verification. The other logits keep their values. NaN logits make the candidates unspecified."""
    vocab, hidden = logits.shape[-1], x.shape[-1]
    lead = logits.shape[:-1]
    k = min(candidates, vocab)
    flat_logits = logits.reshape(-1, vocab)
    x_scale, q1, q2 = _int8_terms(jax.lax.optimization_barrier(x).reshape(-1, hidden), 2)
    top = _top_columns(flat_logits, k)  # [M, k]
    columns = top.reshape(-1)
    if isinstance(head, BlockedInt8Weight):
        codes = _blocked_columns(head, columns)  # [M k, H]
    else:
        codes = jnp.take(head.values, columns, axis=1).T
    fine = jnp.take(residual.values, columns, axis=1)  # [H / 2, M k] two 4-bit codes per byte
    weights = codes.astype(jnp.int32) * HEAD_RESIDUAL_STEPS + unpack_int4(fine).T  # [M k, H], |.| <= 1785
    weights = weights.reshape(*top.shape, hidden)
    # int32 sums (exact: in any order, in any program), over chunks of at most _REFINE_CHUNK rows each.
    chunks = -(-hidden // _REFINE_CHUNK)
    size = _REFINE_CHUNK if chunks > 1 else hidden
    pad = chunks * size - hidden
    both = jnp.pad(jnp.stack([q1, q2]).astype(jnp.int32), ((0, 0), (0, 0), (0, pad))).reshape(2, -1, chunks, size)
    weights = jnp.pad(weights, ((0, 0), (0, 0), (0, pad))).reshape(*top.shape, chunks, size)
    parts = jnp.einsum("tmch,mkch->tmkc", both, weights, preferred_element_type=jnp.int32).astype(jnp.float32)
    sums = parts[..., 0]
    for c in range(1, chunks):  # chunks added in a fixed order (hidden sizes over _REFINE_CHUNK only)
        sums = sums + parts[..., c]
    scales = jnp.take(residual.scales[0], columns).reshape(top.shape).astype(jnp.float32)
    refined = _two_terms_sum(sums[0], sums[1], x_scale) * scales
    rows = jnp.arange(top.shape[0])[:, None]
    return flat_logits.at[rows, top].set(refined.astype(logits.dtype)).reshape(*lead, vocab)


def _w8a8_codes_product(xq: jax.Array, w: QuantizedWeight | BlockedInt8Weight, int8_dot: str) -> jax.Array:
    """int8 codes [..., K] times the weight, with the weight's scales: float32 [..., N]."""
    blocked = isinstance(w, BlockedInt8Weight)
    if blocked or (jax.default_backend() == "cpu" and w.bits == 8 and w.group_size == w.shape[0] and w.offsets is None):
        rows = xq.reshape(-1, xq.shape[-1])
        acc = _blocked_int8_dot(rows, w, int8_dot) if blocked else _cpu_int8_dot(rows, w.values, int8_dot)
        return acc.reshape(*xq.shape[:-1], -1).astype(jnp.float32) * w.scales[0].astype(jnp.float32)
    return quantized_matmul_int8(xq, 1.0, w)


def _blocked_int8_dot(xq: jax.Array, w: BlockedInt8Weight, int8_dot: str = "auto") -> jax.Array:
    """int8 [M, K] @ a `BlockedInt8Weight`'s codes -> int32 [M, N] (exact either way): through the compiled kernel
    when `int8_dot` is "auto" and it runs here (CPU backend, kernel built), else XLA's dot (`_cpu_int8_dot`'s "xla"
    path) on the codes unblocked inside the program. Every row count takes the kernel: on SmolLM2's 210 layer
    products (2-core AVX-512 VNNI EPYC, experiments/int8_matmul_speed.py) it took 6.7 / 9.2 / 26.3 / 49.5 / 89.6 /
    158 / 507 ms at 1 / 4 / 16 / 32 / 64 / 128 / 512 rows against XLA's dot on plain codes 15.4 / 13.5 / 25.6 /
    48.5 / 82.3 / 145 / 521 ms, and XLA's dot on blocked weights first pays ~52 ms a forward unblocking them."""
    if int8_dot == "auto" and jax.default_backend() == "cpu" and cpu_int8_dot.available():
        return cpu_int8_dot.int8_dot_blocked(xq, w.values, w.n)
    return _cpu_int8_dot(xq, cpu_int8_dot.unblock_weights(w.values, w.k, w.n), "xla")


def _cpu_int8_dot(xq: jax.Array, codes: jax.Array, int8_dot: str = "auto") -> jax.Array:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N] (exact either way): up to KERNEL_ROWS rows through the compiled
    kernel when `int8_dot` is "auto" and it is built here, else one plain XLA dot. XLA's CPU backend takes a
    slow path for a single row: measured on SmolLM2's 210 layer products (2-core AMD EPYC, AVX2 only;
    experiments/int8_matmul_speed.py) one row took 155 ms, two rows 17 ms (float32: 19 / 24 ms), so a
    single row is padded to two."""
    rows = xq.shape[0]
    if int8_dot == "auto" and rows <= KERNEL_ROWS and cpu_int8_dot.available():
        return cpu_int8_dot.int8_dot(xq, codes)
    if rows == 1:
        xq = jnp.concatenate([xq, jnp.zeros_like(xq)])
    return cpu_int8_dot.int8_dot_reference(xq, codes)[:rows]


def _top_columns(logits: jax.Array, k: int) -> jax.Array:
    """The columns of the k largest logits of each row [M, V] -> [M, k] (as a set): the top k blocks of _TOP_BLOCK
    by their maxima hold them (an element of the top k has at most k - 1 larger ones, so at most k - 1 blocks have a
    larger maximum than its block), then the top k of those blocks' logits. Ties go to the lower column."""
    rows, vocab = logits.shape
    blocks = -(-vocab // _TOP_BLOCK)
    if blocks <= 2 * k:
        return jax.lax.top_k(logits, k)[1]
    padded = jnp.pad(logits, ((0, 0), (0, blocks * _TOP_BLOCK - vocab)), constant_values=-jnp.inf)
    padded = padded.reshape(rows, blocks, _TOP_BLOCK)
    chosen = jnp.sort(jax.lax.top_k(jnp.max(padded, axis=-1), k)[1], axis=-1)  # in column order: ties as top_k's
    within = jnp.take_along_axis(padded, chosen[:, :, None], axis=1).reshape(rows, k * _TOP_BLOCK)
    best = jax.lax.top_k(within, k)[1]
    return jnp.take_along_axis(chosen, best // _TOP_BLOCK, axis=1) * _TOP_BLOCK + best % _TOP_BLOCK


def embed_tokens(params: dict, config, tokens: jax.Array) -> jax.Array:
    """The embedding rows of `tokens` `[...]` -> `[..., H]`: a float table [V, H], or an int8 one stored as the
    tied output projection's `QuantizedWeight` [H, V] (one scale per vocabulary row; or its `BlockedInt8Weight`,
    gathered from the blocks), dequantized row by row (with `config.head_residual` a tied table's rows are
    r (14 q + q_r), the codes plus their 4-bit residual); under `activation_rotation` a tied table holds the
    rotated rows (E Q, the head's weight Q E^T), which `block_hadamard` turns back (Q Q = I). A DFloat11 table
    decodes only the blocks holding those rows."""
    table = params["embed"]
    if isinstance(table, DFloat11Weight):
        return take_rows(table, tokens)
    if isinstance(table, (QuantizedWeight, BlockedInt8Weight)):
        if isinstance(table, BlockedInt8Weight):
            codes = _blocked_columns(table, tokens).reshape(*tokens.shape, table.k)
        else:
            codes = jnp.moveaxis(jnp.take(table.values, tokens, axis=1), 0, -1)
        if config.head_residual and config.tie_word_embeddings:  # the finer rows: r (14 q + q_r)
            residual = params["head_residual"]
            fine = unpack_int4(jnp.take(residual.values, tokens.reshape(-1), axis=1)).T.reshape(*tokens.shape, -1)
            steps = codes.astype(jnp.int32) * HEAD_RESIDUAL_STEPS + fine
            rows = steps.astype(jnp.float32) * residual.scales[0][tokens][..., None].astype(jnp.float32)
        else:
            rows = codes.astype(jnp.float32) * table.scales[0][tokens][..., None].astype(jnp.float32)
        return block_hadamard(rows) if config.activation_rotation and config.tie_word_embeddings else rows
    return table[tokens]


def _blocked_columns(w: BlockedInt8Weight, columns: jax.Array) -> jax.Array:
    """The codes of `columns` (any shape) of a blocked weight: int8 [columns.size, K], one column per row."""
    flat = columns.reshape(-1)
    blocks = jnp.take(w.values, flat // cpu_int8_dot.COLS, axis=0)  # [C, Kg, 128]
    lanes = blocks.reshape(flat.size, -1, cpu_int8_dot.COLS, cpu_int8_dot.GROUP)
    codes = jnp.take_along_axis(lanes, (flat % cpu_int8_dot.COLS)[:, None, None, None], axis=2)  # [C, Kg, 1, 4]
    return codes.reshape(flat.size, -1)[:, : w.k]


def activation_dtype(params: dict):
    """The dtype hidden states and caches take for `params`: the embedding's (its scales' if it is int8)."""
    table = params["embed"]
    return jnp.dtype(table.scales.dtype if isinstance(table, (QuantizedWeight, BlockedInt8Weight)) else table.dtype)


def logits_from_hidden(params: dict, config, h: jax.Array) -> jax.Array:
    """Project final hidden states `[..., H]` to vocabulary logits `[..., V]` (tied: the embedding); an int8
    output projection multiplies as W8A8 (`int8_matmul`), its input rotated under `activation_rotation`, and with
    `config.head_residual` its top logits refined (`refine_logits`); a DFloat11 one is decoded whole first."""
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    if isinstance(head, DFloat11Weight):
        head = decompress(head)
        params = {**params, "embed" if config.tie_word_embeddings else "lm_head": head}
    if isinstance(head, (QuantizedWeight, BlockedInt8Weight)):
        x = block_hadamard(h).astype(h.dtype) if config.activation_rotation else h
        logits = int8_matmul(x, head, config.int8_dot, HEAD_TERMS)
        return refine_logits(logits, x, head, params["head_residual"]) if config.head_residual else logits
    if config.tie_word_embeddings:
        if math.prod(h.shape[:-1]) <= SMALL_ROWS and jax.default_backend() == "cpu":
            return jnp.moveaxis(jnp.einsum("vh,...h->v...", params["embed"], h), 0, -1)
        return h @ params["embed"].T
    return h @ params["lm_head"]
