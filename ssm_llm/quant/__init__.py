"""Post-training quantization: Quamba / Quamba2 for Mamba-1 / Mamba-2 (`quantize_model`), weight
quantization of attention models (`quantize_weights`), and the generic pieces they are built from
(quantizers, calibration observers, GPTQ)."""

from ssm_llm.quant import quantized_lm  # noqa: F401  (registers the quantized Mamba family)
from ssm_llm.quant.attention_weights import quantize_weights
from ssm_llm.quant.gptq import gptq_quantize, hessian
from ssm_llm.quant.observers import MinMaxObserver, PercentileObserver, clip_value, scale, update
from ssm_llm.quant.quamba import quantize_model
from ssm_llm.quant.quantizers import (
    absmax_scale,
    dequantize,
    fake_quant,
    merge_groups,
    qrange,
    quantize,
    scale_from_absmax,
    split_groups,
)
from ssm_llm.quant.scheme import QuantizedSSMConfig, QuantScheme

__all__ = [
    "MinMaxObserver",
    "PercentileObserver",
    "QuantScheme",
    "QuantizedSSMConfig",
    "absmax_scale",
    "clip_value",
    "dequantize",
    "fake_quant",
    "gptq_quantize",
    "hessian",
    "merge_groups",
    "qrange",
    "quantize",
    "quantize_model",
    "quantize_weights",
    "scale",
    "scale_from_absmax",
    "split_groups",
    "update",
]
