"""Layer-wise mixed bit widths (Dumitru et al. 2024, "Layer-Wise Quantization"): rank the layers by importance
and give the important ones more bits, for an average such as 3.5 that no single integer width reaches.

Importance scores (higher = more important):
- "lim", layer input modification: 1 - cos(input, output) of each layer's hidden states, averaged over the tokens
  of calibration text (a layer that barely changes its input matters less); attention models.
- "zd", z-score distribution: the fraction of a layer's linear weights more than one standard deviation from
  their mean (heavier tails, more important); any family, no data.

`allocate_bits` turns scores into per-layer widths from two given ones; `quantize_layers` stores each layer's
linears as integer codes of its width (`QuantizedWeight`, 2-8 bits, one scale per group of input rows), by
round-to-nearest or GPTQ, absmax or min-max; `bits_per_weight` counts the bytes the result holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pallas_kernels.quantized_matmul import QuantizedWeight
from pallas_kernels.quantized_matmul import quantize_weights as quantize_matrix
from ssm_llm.compress.bitstack import linear_names
from ssm_llm.config import MIXED_WEIGHT_ONLY, ModelConfig
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.models.lm_head import embed_tokens
from ssm_llm.quant.attention_calibration import SITE_OF, as_float32, check_calibration, layer_statistics, walk_layers
from ssm_llm.quant.gptq import gptq_quantize

SCORES = ("lim", "zd")
METHODS = ("rtn", "gptq")


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


@functools.partial(jax.jit, static_argnames=("bits", "group", "symmetric", "scale_dtype"))
def _rounded(w, bits: int, group: int, symmetric: bool, scale_dtype):
    return quantize_matrix(w.astype(jnp.float32), bits, group, scale_dtype, symmetric)


def quantize_layers(
    params: dict,
    config,
    bits: tuple[int, ...],
    group: int = 64,
    *,
    method: str = "rtn",
    symmetric: bool = True,
    calibration=None,
    scale_dtype=jnp.float16,
    progress: bool = True,
):
    """Layer i's linears stored as `bits[i]`-bit `QuantizedWeight`s (2-8 bits: int8, nibbles or bit planes)
    -> (params, config), the layers as a list (widths that differ cannot stack; `forward` runs either layout).

    group: input rows per scale (a matrix whose rows it does not divide takes the largest group dividing both,
    e.g. Mamba-1's dt_proj of 48 rows). method: "rtn" (round to nearest) or "gptq" (attention models: each
    layer's Hessians from its inputs through the already quantized layers, as `quantize_weights(gptq=True)`;
    needs `calibration`, token ids [B, T] of real text). symmetric: absmax codes, or min-max with an offset
    per group (better at 2-3 bits). Scales (and offsets) are stored in `scale_dtype`. An attention config
    comes back with quantization "wxa16" (weight-only, any widths); a Mamba config as it was (its linears
    multiply any `QuantizedWeight` weight-only). `bits_per_weight` counts what the result stores.
    """
    if not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in bits):
        raise ValueError(f"quantize_layers: widths must be ints in [2, 8], got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"quantize_layers: group must be a positive int, got {group!r}")
    if method not in METHODS:
        raise ValueError(f"quantize_layers: method must be one of {METHODS}, got {method!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"quantize_layers: symmetric must be True or False, got {symmetric!r}")
    attention = isinstance(config, ModelConfig)
    if method == "gptq" and not attention:
        raise ValueError("quantize_layers: method 'gptq' walks attention layers; use 'rtn' for Mamba families")
    if method == "gptq" and calibration is None:
        raise ValueError("quantize_layers: method 'gptq' needs calibration= token ids of real text [B, T]")
    if method == "rtn" and calibration is not None:
        raise ValueError("quantize_layers: calibration= is used by method 'gptq' only; pass it or drop calibration")
    qconfig = dataclasses.replace(config, quantization=MIXED_WEIGHT_ONLY) if attention else config
    layers = [dict(layer) for layer in unstack_layers(params)["layers"]]
    if len(bits) != len(layers):
        raise ValueError(f"quantize_layers: {len(bits)} widths for {len(layers)} layers")
    if any(isinstance(layer[n], QuantizedWeight) for layer in layers for n in linear_names(config)):
        raise ValueError("quantize_layers: these params are already quantized; start from the float model")
    names = linear_names(config)
    x = None
    if method == "gptq":
        x = embed_tokens(params, config, check_calibration(calibration, config.vocab_size)).astype(jnp.float32)
    for i, layer in enumerate(tqdm(layers, desc="quantize", disable=not progress, leave=False)):
        hessians = None
        if x is not None:
            _, stats = layer_statistics(config, as_float32(layer), x, config.layer_windows[i], True)
            hessians = {site: np.asarray(v["xtx"], np.float64) for site, v in stats.items()}
        for name in names:
            w = layer[name]
            here = math.gcd(w.shape[0], group)
            try:
                if hessians is None:
                    layer[name] = _rounded(w, bits[i], here, symmetric, scale_dtype)
                else:
                    h = hessians[SITE_OF[name]]
                    layer[name] = gptq_quantize(
                        np.asarray(w, np.float32), h, bits[i], here, symmetric=symmetric, scale_dtype=scale_dtype
                    )
            except ValueError as err:
                raise ValueError(f"quantize_layers: layer {i} {name!r} {tuple(w.shape)}: {err}") from None
        if x is not None:
            x, _ = layer_statistics(qconfig, layer, x, config.layer_windows[i])
    return {**params, "layers": layers}, qconfig


def bits_per_weight(params: dict, config) -> float:
    """Stored bits per weight of the layers' linears (codes, scales and offsets) of `quantize_layers`' output;
    float linears count their dtype's bits."""
    total = weights = 0
    for layer in unstack_layers(params)["layers"]:
        for name in linear_names(config):
            w = layer[name]
            leaves = jax.tree_util.tree_leaves(w)
            total += 8 * sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
            weights += math.prod(w.shape)
    return total / weights
