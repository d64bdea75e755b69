"""Weight quantization for attention models (Llama, Qwen2, Mistral, SmolLM2): `quantize_weights`.

Every linear layer of every block (q, k, v, o, gate, up, down) becomes a `QuantizedWeight`: symmetric
round-to-nearest absmax codes per output channel (`group_size=None`) or per group of input rows, 8 or 4
bits. The embedding and the (tied) lm_head stay float unless `embedding=True` (int8 per vocabulary row, plus its
4-bit rounding residual with `head_residual=True`); norms and biases stay float. The returned config's
`quantization` tells `forward` how to multiply:
  "w8a8"   int8 weights; each product rounds its input rows to int8 with one absmax scale per token
           (dynamic, no calibration) and accumulates in int32 (`ssm_llm.models.lm_head.int8_matmul`);
  "w8a16"  int8 weights, float activations (weight-only);
  "w4a16"  int4 weights (two per byte), float activations.
With `calibration` (token ids of real text) the layers are walked one at a time, each layer's inputs
computed by the already quantized layers before it, and two corrections use them:
  smoothing=alpha  SmoothQuant's outlier migration before W8A8 rounding (`ssm_llm.quant.smoothquant`);
  gptq=True        GPTQ instead of round-to-nearest for every linear (`ssm_llm.quant.gptq`).
`rotation=True` ("w8a8", no calibration needed) rotates every linear's input by a block Hadamard matrix
before its int8 rounding (QuaRot's online rotation, `config.activation_rotation`), spreading outlier
channels over their block; the weights' rows hold the same rotation, so the float product is unchanged.
The quantized model runs through the same `forward`, `generate`, KV compression and speculative decoding,
and saves / loads with `converters.save` / `converters.load` keeping the integer codes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pallas_kernels.quantized_matmul import QuantizedWeight
from pallas_kernels.quantized_matmul import quantize_weights as quantize_matrix
from pallas_kernels.quantized_matmul.weights import int_values, pack_int4
from ssm_llm.config import WEIGHT_BITS, ModelConfig
from ssm_llm.hadamard import block_hadamard
from ssm_llm.layer_layout import is_stacked, stack_layers, unstack_layers
from ssm_llm.models.attention_lm import LINEARS, check_linear_kinds
from ssm_llm.models.lm_head import HEAD_RESIDUAL_STEPS, embed_tokens
from ssm_llm.param_check import check_params
from ssm_llm.quant.attention_calibration import SITE_OF, check_calibration, layer_statistics
from ssm_llm.quant.gptq import gptq_quantize
from ssm_llm.quant.smoothquant import smooth_layer


def quantize_weights(
    params: dict,
    config: ModelConfig,
    scheme: str,
    group_size: int | None = None,
    *,
    calibration=None,
    smoothing: float | None = None,
    gptq: bool = False,
    rotation: bool = False,
    embedding: bool = False,
    head_residual: bool = False,
    progress: bool = True,
):
    """Quantize an attention model's linear layers (see the module docstring) -> (params, config).

    scheme: "w8a8", "w8a16" or "w4a16"; group_size: rows of the input dimension sharing one scale (None:
    one scale per output channel); it must divide every linear's input size. calibration: token ids
    [B, T] of real text (no padding), needed by `smoothing` (SmoothQuant's alpha in (0, 1], "w8a8" only)
    and `gptq`. rotation: see the module docstring ("w8a8" only). embedding ("w8a8" only): the embedding
    (and an untied lm_head) becomes int8 too, one scale per vocabulary row (`config.int8_embedding`; the
    logits then a W8A8 product). head_residual (with embedding): also keep the int8 head's rounding residual in 4
    bits (`config.head_residual`: an eighth of the head's float32 bytes), against which each row's top logits are
    recomputed and a tied embedding's rows are read (`ssm_llm.models.lm_head.refine_logits`). Works on either layer
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
    _check_corrections(scheme, calibration, smoothing, gptq)
    if not isinstance(rotation, bool) or (rotation and scheme != "w8a8"):
        raise ValueError(f"rotation (True or False) rotates int8 activations: scheme 'w8a8' only, got {rotation!r}")
    if not isinstance(embedding, bool) or (embedding and scheme != "w8a8"):
        raise ValueError(
            f"embedding (True or False) makes the logits a W8A8 product: scheme 'w8a8' only, got {embedding!r}"
        )
    if not isinstance(head_residual, bool) or (head_residual and not embedding):
        raise ValueError(
            f"head_residual (True or False) refines the int8 output projection: it needs embedding=True, got "
            f"head_residual={head_residual!r} with embedding={embedding!r}"
        )
    if head_residual and config.hidden_size % 2:
        raise ValueError(
            f"head_residual packs two 4-bit codes per byte along the hidden size, which must be even, got "
            f"{config.hidden_size}"
        )
    check_params(params, config)
    check_linear_kinds(params, config)  # float linears: a QuantizedWeight under a "none" config is refused
    bits = WEIGHT_BITS[scheme]
    qconfig = dataclasses.replace(
        config,
        quantization=scheme,
        activation_rotation=rotation,
        int8_embedding=embedding,
        head_residual=head_residual,
    )
    layers = params["layers"]
    if calibration is not None:
        tokens = check_calibration(calibration, config.vocab_size)
        quantized = _calibrated(params, config, qconfig, tokens, group_size, smoothing, gptq, progress)
        new_layers = (stack_layers(quantized) if is_stacked(params) else quantized)["layers"]
    elif isinstance(layers, (list, tuple)):
        new_layers = [_rounded_layer(layer, rotation, bits, group_size, stacked=False) for layer in layers]
    else:
        new_layers = _rounded_layer(layers, rotation, bits, group_size, stacked=True)
    out = {**params, "layers": new_layers}
    if embedding:  # int8 per vocabulary row, laid out as the output projection [H, V], its rows rotated like
        # every linear's under `rotation`: on SmolLM2 (W8A8 rotated layers) the int8 head took the model's KL to
        # float32 from 0.0034 to 0.0175 with its input unrotated, to 0.0046 rotated; int8 rows alone cost nothing
        head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
        rows = _int8_rows(head, rotation)
        out["lm_head" if not config.tie_word_embeddings else "embed"] = rows
        if head_residual:
            out["head_residual"] = _residual_rows(head, rows, rotation)
        if not config.tie_word_embeddings:
            out["embed"] = _int8_rows(params["embed"].T, False)
    return out, qconfig


# Rounding to nearest runs as one compiled program per layer shape: op by op it took 18 s on SmolLM2 (8 s with
# the ops compiled), most of it compiling and dispatching the rotations' butterflies.
@functools.partial(jax.jit, static_argnames=("rotation", "bits", "group_size", "stacked"))
def _rounded_layer(layer: dict, rotation: bool, bits: int, group_size: int | None, stacked: bool) -> dict:
    return _quantize_layer(_rotated(layer, rotation), bits, group_size, stacked=stacked)


@functools.partial(jax.jit, static_argnames=("rotation",))
def _int8_rows(head, rotation: bool):
    """An output projection [H, V] as int8 with one scale per vocabulary row (its rows rotated under
    `rotation`)."""
    head = block_hadamard(head, axis=0) if rotation else head
    return quantize_matrix(head, bits=8, group_size=head.shape[0])


@functools.partial(jax.jit, static_argnames=("rotation",))
def _residual_rows(head, rows: QuantizedWeight, rotation: bool):
    """What `rows` (`_int8_rows(head, rotation)`) leave out, W - s q (|.| <= s / 2), as a 4-bit `QuantizedWeight`
    [H, V] with scales s / HEAD_RESIDUAL_STEPS (codes in [-7, 7])."""
    w = (block_hadamard(head, axis=0) if rotation else head).astype(jnp.float32)
    scale = rows.scales.astype(jnp.float32)
    fine = scale / HEAD_RESIDUAL_STEPS
    r = jnp.round((w - int_values(rows).astype(jnp.float32) * scale) / jnp.where(fine > 0, fine, 1.0))
    lim = HEAD_RESIDUAL_STEPS // 2
    codes = jnp.clip(r, -lim, lim)
    return QuantizedWeight(pack_int4(codes), fine.astype(rows.scales.dtype), bits=4, group_size=head.shape[0])


def _check_corrections(scheme: str, calibration, smoothing, gptq) -> None:
    if not isinstance(gptq, bool):
        raise ValueError(f"gptq must be True or False, got {gptq!r}")
    if smoothing is not None:
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
            raise ValueError(f"smoothing is SmoothQuant's migration strength alpha in (0, 1], got {smoothing!r}")
        if scheme != "w8a8":
            raise ValueError(
                f"smoothing moves activation outliers into the weights, which helps only when activations are "
                f"quantized (scheme 'w8a8'), not {scheme!r}"
            )
    wants = smoothing is not None or gptq
    if wants and calibration is None:
        raise ValueError("smoothing and gptq need calibration= token ids of real text [B, T]")
    if calibration is not None and not wants:
        raise ValueError("calibration= is used only by smoothing= or gptq=True; pass one of them or drop it")


def _calibrated(params, config, qconfig, tokens, group_size, smoothing, gptq, progress) -> dict:
    """Quantize layer by layer: statistics of layer i's inputs come from the quantized layers 0..i-1."""
    layers = unstack_layers(params)["layers"]
    bits = WEIGHT_BITS[qconfig.quantization]
    x = embed_tokens(params, config, tokens)
    new_layers = []
    for i, layer in enumerate(tqdm(layers, desc="quantize", disable=not progress, leave=False)):
        window = config.layer_windows[i]
        _, stats = layer_statistics(config, layer, x, window, hessians=gptq)
        scales = None
        if smoothing is not None:
            layer, scales = smooth_layer(layer, config, {site: v["amax"] for site, v in stats.items()}, smoothing)
        layer = _rotated(layer, qconfig.activation_rotation)
        hessians = None
        if gptq:
            hessians = {}
            for site, v in stats.items():
                xtx = np.asarray(v["xtx"], np.float64)
                if scales is not None:  # the smoothed layer reads x / s
                    inv = 1.0 / np.asarray(scales[site], np.float64)
                    xtx = xtx * inv[:, None] * inv[None, :]
                if qconfig.activation_rotation:  # and then x Q: Q^T xtx Q (Q symmetric)
                    xtx = np.asarray(block_hadamard(block_hadamard(xtx, axis=0), axis=1), np.float64)
                hessians[site] = xtx
        qlayer = _quantize_layer(layer, bits, group_size, stacked=False, hessians=hessians)
        x, _ = layer_statistics(qconfig, qlayer, x, window)
        new_layers.append(qlayer)
    return {**params, "layers": new_layers}


def _rotated(layer: dict, rotation: bool) -> dict:
    """The layer's linears with their input rows rotated (Q w, Q the block Hadamard of `block_hadamard`),
    for inputs rotated the same way (x Q)(Q w) = x w."""
    if not rotation:
        return layer
    return {**layer, **{name: block_hadamard(layer[name], axis=-2) for name in LINEARS}}


def _quantize_layer(layer: dict, bits: int, group_size: int | None, stacked: bool, hessians=None) -> dict:
    out = dict(layer)
    for name in LINEARS:
        w = layer[name]
        k = w.shape[-2]
        size = k if group_size is None else group_size
        if k % size:
            raise ValueError(f"group_size {group_size} does not divide the input size {k} of {name!r}")
        if hessians is not None:
            out[name] = gptq_quantize(w, hessians[SITE_OF[name]], bits=bits, group_size=size)
            continue
        quantize = functools.partial(quantize_matrix, bits=bits, group_size=size)
        out[name] = jax.vmap(quantize)(w) if stacked else quantize(w)
    return out
