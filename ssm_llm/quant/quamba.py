"""Quamba / Quamba2 post-training quantization of Mamba-1 / Mamba-2: the offline pipeline.

    qparams, qconfig = quantize_model(params, config, calibration_tokens, QuantScheme.quamba2("W8A8"))
    logits, cache = ssm_llm.forward(qparams, qconfig, tokens, ssm_llm.init_cache(qconfig, B, T))

Steps (each ingredient can be switched off in `QuantScheme`, for ablations):
  1. Mamba-2 with `cluster`: calibrate the float model, sort-and-cluster the SSM input x
     (`ssm_llm.quant.reorder`) and permute the weights so each cluster is contiguous (exact).
  2. Fold the norms into the next linears; with `hadamard`, also rotate the residual stream and the
     out_proj input (`ssm_llm.quant.rotation`, exact).
  3. Calibrate the transformed model (`ssm_llm.quant.calibration`).
  4. Activation scales (8-bit activations): per tensor, except x per (SSD group, head group, dim group)
     cluster, B / C and the conv input's B / C channels per state group, and the SSM state per x cluster;
     the observer ("minmax" / "percentile") sets x's and the state's per-tensor range.
  5. Weights: 8-bit per output channel, 4-bit per group of `group_size` input rows (packed two per
     byte), by GPTQ with the calibration Hessian of each linear's input or by round-to-nearest.
     GPTQ runs on Hessians of the float (transformed) model, not layer by layer on quantized outputs.
The embedding and lm_head stay in float (as in Quamba2); the SSM itself runs in float on 8-bit inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import quantize_weights
from ssm_llm.layer_layout import stack_layers
from ssm_llm.option_spec import check_int, shown
from ssm_llm.quant.calibration import Calibration, calibrate, check_calibration_tokens
from ssm_llm.quant.gptq import gptq_quantize
from ssm_llm.quant.quantizers import scale_from_absmax
from ssm_llm.quant.reorder import XClusters, permute_mamba2, sort_and_cluster
from ssm_llm.quant.rotation import fold_norms, rotate_model
from ssm_llm.quant.scheme import QuantizedSSMConfig, QuantScheme
from ssm_llm.ssm_config import Mamba2Config

ACT_BITS = 8


def linear_names(config) -> tuple[str, ...]:
    """The quantized linears of a block."""
    return ("in_proj", "out_proj") if isinstance(config, Mamba2Config) else ("in_proj", "x_proj", "dt_proj", "out_proj")


def _check_scheme(scheme) -> None:
    """A TypeError unless `scheme` is a QuantScheme (a bit string such as "W8A8" is not: say how to build one)."""
    if isinstance(scheme, QuantScheme):
        return
    bits = scheme if isinstance(scheme, str) and len(scheme) <= 8 else "W8A8"
    raise TypeError(
        f"quantize_model: scheme must be a QuantScheme, got {type(scheme).__name__} {shown(scheme)}; "
        f"build one with QuantScheme.quamba2({bits!r}) (Mamba-2), QuantScheme.quamba({bits!r}) "
        f"(Mamba-1) or QuantScheme.naive({bits!r}) (the round-to-nearest baseline)"
    )


def quantize_model(
    params: dict, config, tokens, scheme: QuantScheme, *, batch_size: int = 8, progress: bool = True
) -> tuple[dict, QuantizedSSMConfig]:
    """Quantize a float Mamba / Mamba-2 model with `scheme`, calibrating on `tokens: [N, T]` (int ids).

    Returns `(params, QuantizedSSMConfig)` for `ssm_llm.forward` / `generate`. See the module docstring.
    Raises TypeError for a scheme that is not a QuantScheme or a model that is not a float Mamba / Mamba-2,
    ValueError for a scheme that does not fit the model or bad calibration tokens.
    """
    _check_scheme(scheme)
    check_int("quantize_model", "batch_size", batch_size)
    qconfig = QuantizedSSMConfig(config, scheme)  # validates the scheme against the model
    tokens = check_calibration_tokens(tokens, config.vocab_size)  # also when round-to-nearest needs none
    params = stack_layers(params)
    calibrate_kw = {"batch_size": batch_size, "progress": progress}
    clusters = None
    if isinstance(config, Mamba2Config) and scheme.cluster and scheme.quantizes_acts:
        first = calibrate(params, config, tokens, **calibrate_kw)
        clusters = sort_and_cluster(np.stack(first.mean_abs_x), config, scheme.head_groups, scheme.dim_groups)
        params = permute_mamba2(params, config, clusters)
    params = rotate_model(params, config) if scheme.hadamard else fold_norms(params, config)
    calib = None
    if scheme.quantizes_acts or (scheme.quantizes_weights and scheme.gptq):  # round-to-nearest needs no data
        alpha = scheme.percentile_alpha if scheme.observer == "percentile" and scheme.quantizes_acts else None
        calib = calibrate(params, config, tokens, online_hadamard=scheme.hadamard, alpha=alpha, **calibrate_kw)
    layers = dict(params["layers"])
    if scheme.quantizes_weights:
        for name in linear_names(config):
            per_layer = [
                quantize_linear(layers[name][i], calib.hessian[f"{name}_in"][i] if scheme.gptq else None, scheme, name)
                for i in range(config.num_layers)
            ]
            layers[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
    if scheme.quantizes_acts:
        layers["scales"] = activation_scales(calib, config, scheme, clusters)
    return {**params, "layers": layers}, qconfig


def weight_group(k: int, scheme: QuantScheme, name: str) -> int:
    """Rows per scale for a [K, N] weight: K for 8 bits (per channel), else `group_size` (or K if smaller)."""
    if scheme.weight_bits == 8 or k <= scheme.group_size:
        group = k
    else:
        group = scheme.group_size
    if scheme.weight_bits == 4 and k % 2:
        raise ValueError(f"{name}: 4-bit weights pack two input rows per byte, so its input size must be even, got {k}")
    if k % group:
        raise ValueError(
            f"{name}: its input size {k} is not a multiple of the 4-bit group_size {group}; "
            f"choose a group_size dividing {k}"
        )
    return group


def quantize_linear(w, h, scheme: QuantScheme, name: str = "linear"):
    """One weight w: [K, N] -> QuantizedWeight by GPTQ (with Hessian h: [K, K]) or round-to-nearest
    (h unused, may be None)."""
    group = weight_group(w.shape[0], scheme, name)
    if scheme.gptq:
        return gptq_quantize(np.asarray(w), h, bits=scheme.weight_bits, group_size=group, damp=scheme.gptq_damp)
    return quantize_weights(jnp.asarray(w, jnp.float32), scheme.weight_bits, group)


def _cluster_max(values: np.ndarray, cluster: np.ndarray, n: int) -> np.ndarray:
    """values, cluster: [C] -> each channel's cluster maximum [C]."""
    top = np.full(n, 0.0, np.float64)
    np.maximum.at(top, cluster, values)
    return top[cluster]


def activation_scales(calib: Calibration, config, scheme: QuantScheme, clusters: XClusters | None) -> dict:
    """The static 8-bit scales of every quantization point, stacked over layers (see the module docstring)."""
    mamba2 = isinstance(config, Mamba2Config)
    out = {}
    for layer in range(config.num_layers):
        absmax = {name: np.asarray(v[layer], np.float64) for name, v in calib.absmax.items()}

        def tensor(name, layer=layer, absmax=absmax):
            if name in calib.percentile:
                return np.float64(calib.percentile[name][layer])
            return absmax[name].max()

        s = {name: tensor(name) for name in absmax if name not in ("x", "B", "C", "conv_in", "state")}
        if mamba2 and clusters is not None:
            s["x"] = _cluster_max(absmax["x"], clusters.cluster[layer], clusters.n_clusters)
            s["state"] = _cluster_max(
                absmax["state"].reshape(-1), clusters.cluster[layer], clusters.n_clusters
            ).reshape(config.num_heads, config.head_dim, 1)
        else:
            s["x"], s["state"] = tensor("x"), tensor("state")
        if mamba2 and scheme.bc_groups:
            groups = config.n_groups
            for name in ("B", "C"):
                s[name] = np.repeat(absmax[name].reshape(groups, -1).max(axis=1), config.state_size)
            inner, gn = config.intermediate_size, groups * config.state_size
            conv = absmax["conv_in"]
            s["conv_in"] = np.concatenate(
                [
                    np.full(inner, conv[:inner].max()),
                    np.repeat(conv[inner : inner + gn].reshape(groups, -1).max(axis=1), config.state_size),
                    np.repeat(conv[inner + gn :].reshape(groups, -1).max(axis=1), config.state_size),
                ]
            )
        else:
            s["B"], s["C"], s["conv_in"] = tensor("B"), tensor("C"), tensor("conv_in")
        if not mamba2:  # the linears after x and dt_low read them on their own grids
            s["x_proj_in"], s["dt_proj_in"] = s["x"], s["dt_low"]
        for name, value in s.items():
            out.setdefault(name, []).append(np.asarray(scale_from_absmax(value, ACT_BITS)))
    return {name: jnp.asarray(np.stack(v)) for name, v in out.items()}
