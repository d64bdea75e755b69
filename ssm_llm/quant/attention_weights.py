"""Weight quantization for attention models (Llama, Qwen2, Mistral, SmolLM2): `quantize_weights`.

Every linear layer of every block (q, k, v, o, gate, up, down) becomes a `QuantizedWeight`: symmetric
round-to-nearest absmax codes per output channel (`group_size=None`) or per group of input rows, 8 or 4
bits. The embedding, the (tied) lm_head, norms and biases stay float. The returned config's
`quantization` tells `forward` how to multiply:
  "w8a8"   int8 weights; each product rounds its input rows to int8 with one absmax scale per token
           (dynamic, no calibration) and accumulates in int32 (`ssm_llm.models.lm_head.int8_matmul`);
  "w8a16"  int8 weights, float activations (weight-only);
  "w4a16"  int4 weights (two per byte), float activations.
The quantized model runs through the same `forward`, `generate`, KV compression and speculative decoding,
and saves / loads with `converters.save` / `converters.load` keeping the integer codes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from pallas_kernels.quantized_matmul import quantize_weights as quantize_matrix
from ssm_llm.config import WEIGHT_BITS, ModelConfig
from ssm_llm.models.attention_lm import LINEARS, check_linear_kinds
from ssm_llm.param_check import check_params


def quantize_weights(params: dict, config: ModelConfig, scheme: str, group_size: int | None = None):
    """Quantize an attention model's linear layers (see the module docstring) -> (params, config).

    scheme: "w8a8", "w8a16" or "w4a16"; group_size: rows of the input dimension sharing one scale (None:
    one scale per output channel); it must divide every linear's input size. Works on either layer
    layout (stacked or a list of per-layer dicts) and keeps it.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"quantize_weights quantizes attention models (ModelConfig), got {type(config).__name__}; "
            "Mamba / Mamba-2 are quantized with ssm_llm.quant.quantize_model (Quamba / Quamba2)"
        )
    if scheme not in WEIGHT_BITS:
        raise ValueError(f"scheme must be one of {', '.join(WEIGHT_BITS)}, got {scheme!r}")
    if config.quantization != "none":
        raise ValueError(
            f"these params are already quantized ({config.quantization!r}); quantize the float model instead "
            "(schemes do not stack)"
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None (per output channel), got {group_size!r}")
    check_params(params, config)
    check_linear_kinds(params, config)  # float linears: a QuantizedWeight under a "none" config is refused
    bits = WEIGHT_BITS[scheme]
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        new_layers = [_quantize_layer(layer, bits, group_size, stacked=False) for layer in layers]
    else:
        new_layers = _quantize_layer(layers, bits, group_size, stacked=True)
    return {**params, "layers": new_layers}, dataclasses.replace(config, quantization=scheme)


def _quantize_layer(layer: dict, bits: int, group_size: int | None, stacked: bool) -> dict:
    out = dict(layer)
    for name in LINEARS:
        w = layer[name]
        k = w.shape[-2]
        size = k if group_size is None else group_size
        if k % size:
            raise ValueError(f"group_size {group_size} does not divide the input size {k} of {name!r}")
        quantize = functools.partial(quantize_matrix, bits=bits, group_size=size)
        out[name] = jax.vmap(quantize)(w) if stacked else quantize(w)
    return out
