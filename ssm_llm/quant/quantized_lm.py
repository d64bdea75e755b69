"""The model family of quantized Mamba / Mamba-2 (`QuantizedSSMConfig`): the float blocks of
`ssm_llm.models.mamba_mixers` run with quantizing `ops`, so `forward` / `generate` need nothing new.

params: the float model's layout after `ssm_llm.quant.quamba.quantize_model`: norms are ones, `lm_head`
is explicit, each linear (`in_proj`, `out_proj`; Mamba-1 also `x_proj`, `dt_proj`) is a
`QuantizedWeight` (or float for W16), and `layers["scales"]` holds the static activation scales:
  "<linear>_in" (the linear's input, per tensor), and the named activations of the block (`z`,
  `conv_in`, `x`, `B`, `C`, `dt` / `dt_low`) shaped to broadcast over their last axis, plus "state"
  (broadcasts over a cached SSM state without its batch axis).

With 8-bit activations every linear takes int8 codes (`quantized_matmul_int8`, integer accumulation),
the other named activations are rounded to their 8-bit grid and the SSM runs in float on those values,
as in Quamba2's kernels; with `quantize_state` the cache keeps conv and SSM states as int8 codes.
`simulated=True` replaces the integer matmuls with float matmuls of the dequantized operands.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul import QuantizedWeight, dequantize_weights, quantized_matmul, quantized_matmul_int8
from ssm_llm.models import mamba_lm
from ssm_llm.models.mamba_lm import param_shapes as float_param_shapes
from ssm_llm.models.mamba_lm import run_blocks
from ssm_llm.models.mamba_mixers import mamba1_mixer, mamba2_mixer
from ssm_llm.models.registry import Family, register
from ssm_llm.param_check import ANY
from ssm_llm.quant.quantizers import dequantize, fake_quant, quantize
from ssm_llm.quant.rotation import hadamard
from ssm_llm.quant.scheme import QuantizedSSMConfig
from ssm_llm.ssm_cache import SSMCache
from ssm_llm.ssm_config import Mamba2Config

ACT_BITS = 8


@dataclasses.dataclass(frozen=True)
class QuantOps:
    """The `ops` of a quantized block (see `ssm_llm.models.mamba_mixers.FloatOps`)."""

    quantize_acts: bool
    online_hadamard: bool
    simulated: bool
    impl: str

    def act(self, name: str, x, p: dict):
        scale = p["scales"].get(name) if self.quantize_acts else None
        return x if scale is None else fake_quant(x, scale, ACT_BITS).astype(x.dtype)

    def linear(self, name: str, x, p: dict):
        w, b = p[name], p.get(f"{name}_b")
        if name == "out_proj" and self.online_hadamard:
            x = hadamard(x)
        if not isinstance(w, QuantizedWeight):  # W16: float weights
            y = self.act(f"{name}_in", x, p) @ w
        elif self.quantize_acts:
            scale = p["scales"][f"{name}_in"]
            if self.simulated:
                y = fake_quant(x, scale, ACT_BITS) @ dequantize_weights(w)
            else:
                y = quantized_matmul_int8(quantize(x, scale, ACT_BITS), scale, w, impl=self.impl)
        else:
            y = (
                x.astype(jnp.float32) @ dequantize_weights(w)
                if self.simulated
                else quantized_matmul(x, w, impl=self.impl)
            )
        return y if b is None else y + b


def _state_codes(config: QuantizedSSMConfig) -> bool:
    return config.scheme.quantizes_acts and config.scheme.quantize_state


def param_shapes(config: QuantizedSSMConfig) -> dict:
    """The float model's shapes with an explicit lm_head (quantized linears keep their logical [L, K, N]
    shape) plus, with 8-bit activations, `layers["scales"]`."""
    shapes = float_param_shapes(dataclasses.replace(config.base, tie_word_embeddings=False))
    if config.scheme.quantizes_acts:
        shapes["layers"]["scales"] = ANY
    return shapes


def init_params(config, key, dtype=jnp.float32):
    del key, dtype
    raise TypeError(
        "a quantized model has no random init: quantize a float model with "
        "ssm_llm.quant.quantize_model(params, config, calibration_tokens, scheme)"
    )


def init_cache(config: QuantizedSSMConfig, batch: int, max_len: int, dtype=jnp.float32) -> SSMCache:
    """The base model's cache; with int8 states (`quantize_state`) both states are int8 codes."""
    cache = mamba_lm.init_cache(config.base, batch, max_len, dtype)
    if not _state_codes(config):
        return cache
    return cache.replace(conv_state=cache.conv_state.astype(jnp.int8), ssm_state=cache.ssm_state.astype(jnp.int8))


def hidden_states(
    params: dict,
    config: QuantizedSSMConfig,
    tokens: jax.Array,
    cache: SSMCache,
    token_counts: jax.Array,
    impl: str = "auto",
    cache_is_empty: bool = False,
    sequence_parallel=None,
) -> tuple[jax.Array, SSMCache]:
    """`mamba_lm.hidden_states` for a quantized model (same contract; no sequence-parallel form, which
    `ssm_llm.model.check_sequence_parallel` refuses before any tracing)."""
    del cache_is_empty, sequence_parallel
    base, scheme = config.base, config.scheme
    ops = QuantOps(scheme.quantizes_acts, scheme.hadamard, config.simulated, impl)
    mixer = mamba2_mixer if isinstance(base, Mamba2Config) else mamba1_mixer
    codes = _state_codes(config)

    def layer_mixer(p, h, conv, ssm):
        if codes:  # states arrive and leave as int8 codes on the conv-input / state grids
            conv_scale, state_scale = p["scales"]["conv_in"][..., None], p["scales"]["state"]
            conv, ssm = dequantize(conv, conv_scale), dequantize(ssm, state_scale)
        out, conv, ssm = mixer(base, impl, p, h, conv, ssm, token_counts, ops)
        if codes:
            conv, ssm = quantize(conv, conv_scale, ACT_BITS), quantize(ssm, state_scale, ACT_BITS)
        return out, conv, ssm

    return run_blocks(params, base, tokens, cache, token_counts, layer_mixer)


# Speculative decoding keeps one float state per tree node: quantized targets are not supported yet.
register(QuantizedSSMConfig, Family("quamba", sys.modules[__name__], SSMCache, tree_verifier=None))
