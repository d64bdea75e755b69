"""Layer-wise mixed bit widths (Dumitru et al. 2024, "Layer-Wise Quantization"): rank the layers by importance
and give the important ones more bits, for an average such as 3.5 that no single integer width reaches.

Importance scores (higher = more important):
- "lim", layer input modification: 1 - cos(input, output) of each layer's hidden states, averaged over the tokens
  of calibration text (a layer that barely changes its input matters less); attention models.
- "zd", z-score distribution: the fraction of a layer's linear weights more than one standard deviation from
  their mean (heavier tails, more important); any family, no data.

`allocate_bits` turns scores into per-layer widths from two given ones; `quantize_layers` rounds each layer's
linears to its width (symmetric round-to-nearest per group of input rows; simulated: the rounded weights are
stored as floats, and the widths count what integer codes would store).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ssm_llm.compress.bitstack import linear_names
from ssm_llm.config import ModelConfig
from ssm_llm.layer_layout import stack_layers, unstack_layers
from ssm_llm.quant.attention_calibration import check_calibration, walk_layers

SCORES = ("lim", "zd")


def layer_scores(params: dict, config, score: str = "lim", calibration=None) -> np.ndarray:
    """One importance score per layer [L] (see the module doc); "lim" needs `calibration` token ids [B, T]."""
    if score not in SCORES:
        raise ValueError(f"layer_scores: score must be one of {SCORES}, got {score!r}")
    if score == "zd":
        out = []
        for layer in unstack_layers(params)["layers"]:
            w = np.concatenate([np.asarray(layer[n], np.float32).reshape(-1) for n in linear_names(config)])
            out.append(float(np.mean(np.abs(w - w.mean()) > w.std())))
        return np.array(out)
    if not isinstance(config, ModelConfig):
        raise ValueError("layer_scores: 'lim' walks attention layers; use score='zd' for Mamba families")
    if calibration is None:
        raise ValueError("layer_scores: 'lim' compares each layer's input and output on calibration text: pass it")
    out = []
    for x, y, _ in walk_layers(params, config, check_calibration(calibration, config.vocab_size)):
        cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-12)
        out.append(float(1.0 - jnp.mean(cos)))
    return np.array(out)


def allocate_bits(scores, target: float, widths: tuple[int, int]) -> tuple[int, ...]:
    """Per-layer widths averaging exactly `target`: the most important layers (highest scores) get widths[1],
    the rest widths[0]. Raises ValueError when no count of layers gives `target` exactly (the message names
    the nearest averages that exist)."""
    low, high = widths
    if not (isinstance(low, int) and isinstance(high, int) and 2 <= low < high <= 8):
        raise ValueError(f"allocate_bits: widths must be two ints 2 <= low < high <= 8, got {widths!r}")
    scores = np.asarray(scores, np.float64)
    count = len(scores)
    if not low <= target <= high:
        raise ValueError(f"allocate_bits: target {target} lies outside widths {widths}")
    n_high = (target - low) * count / (high - low)
    if abs(n_high - round(n_high)) > 1e-9:
        below, above = np.floor(n_high), np.ceil(n_high)
        raise ValueError(
            f"allocate_bits: {count} layers at {low} or {high} bits cannot average {target}; the nearest are "
            f"{low + below * (high - low) / count:g} and {low + above * (high - low) / count:g}"
        )
    order = np.argsort(-scores, kind="stable")
    bits = np.full(count, low)
    bits[order[: round(n_high)]] = high
    return tuple(int(b) for b in bits)


def round_to_nearest(w, bits: int, group: int):
    """w [in, out] rounded to symmetric `bits`-bit codes (+-(2^(bits-1) - 1)), one scale per `group` input rows
    and output column (`group` must divide the rows); returned as floats in w's dtype."""
    rows = w.shape[0]
    if rows % group:
        raise ValueError(f"round_to_nearest: group {group} must divide the input size {rows}")
    q_max = 2 ** (bits - 1) - 1
    grouped = jnp.asarray(w, jnp.float32).reshape(rows // group, group, -1)
    scale = jnp.max(jnp.abs(grouped), axis=1, keepdims=True) / q_max
    codes = jnp.clip(jnp.round(grouped / jnp.where(scale > 0, scale, 1.0)), -q_max, q_max)
    return (codes * scale).reshape(w.shape).astype(w.dtype)


def quantize_layers(params: dict, config, bits: tuple[int, ...], group: int = 64) -> tuple[dict, float]:
    """`params` with layer i's linears rounded to bits[i] (see `round_to_nearest`) in the stacked layout, and the
    average bits per linear weight (codes plus a 16-bit scale per group; a matrix whose rows `group` does not
    divide takes the largest group dividing both)."""
    layers = [dict(layer) for layer in unstack_layers(params)["layers"]]
    if len(bits) != len(layers):
        raise ValueError(f"quantize_layers: {len(bits)} widths for {len(layers)} layers")
    if not all(isinstance(b, int) and 2 <= b <= 8 for b in bits):
        raise ValueError(f"quantize_layers: widths must be ints in [2, 8], got {bits!r}")
    total = weights = 0
    for layer, width in zip(layers, bits, strict=True):
        for name in linear_names(config):
            rows = layer[name].shape[0]
            here = math.gcd(rows, group)  # e.g. Mamba-1's dt_proj reads time_step_rank = 48 rows
            layer[name] = round_to_nearest(layer[name], width, here)
            size = int(np.prod(layer[name].shape))
            total += size * (width + 16 / here)
            weights += size
    return stack_layers({**params, "layers": layers}), total / weights
