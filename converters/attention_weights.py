"""The mapping table from Hugging Face tensor names to the attention family's params."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from converters.gguf_codes import as_quantized, requantized, stack
from converters.weight_table import TensorView, convert_weights, fetch
from pallas_kernels.quantized_matmul import QuantizedWeight
from ssm_llm.config import WEIGHT_BITS, ModelConfig
from ssm_llm.models.attention_lm import LINEARS, param_shapes

# our name -> (Hugging Face name, layout; see converters.weight_table)
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", "same"),
    "final_norm": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "linear"),
}
LAYER_TENSORS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "same"),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", "linear"),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", "linear"),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", "linear"),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", "linear"),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", "same"),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", "same"),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", "same"),
    "bo": ("model.layers.{i}.self_attn.o_proj.bias", "same"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "same"),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "linear"),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", "linear"),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", "linear"),
    "b_gate": ("model.layers.{i}.mlp.gate_proj.bias", "same"),
    "b_up": ("model.layers.{i}.mlp.up_proj.bias", "same"),
    "b_down": ("model.layers.{i}.mlp.down_proj.bias", "same"),
}
# Buffers some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def convert_attention_weights(
    config: ModelConfig, source: Mapping, dtype=jnp.float32, progress: bool = False, on_host: bool = False
) -> dict:
    """Build the params pytree for `config` from Hugging Face-named tensors in `source` (strict)."""
    return convert_weights(
        param_shapes(config),
        GLOBAL_TENSORS,
        LAYER_TENSORS,
        config.num_layers,
        source,
        dtype,
        progress,
        tied=config.tie_word_embeddings,
        ignored_suffixes=_IGNORED_SUFFIXES,
        on_host=on_host,
    )


def _linear_weight(source: Mapping, name: str, shape: tuple[int, int], bits: int, group_size) -> QuantizedWeight:
    """One linear [in, out] as a `bits`-bit QuantizedWeight: the source's own block codes (a GGUF block
    format, a GPTQ / AWQ packed linear) where `group_size == "native"` and they fit `bits`, else rounded to
    nearest from the float tensor (groups of `group_size` rows; None: per output channel; "native": 32 rows
    at 4 bits, per channel at 8)."""
    if name not in source:
        raise ValueError(f"checkpoint is missing tensor {name!r}")
    k, n = shape
    needs = source.native_bits(name) if hasattr(source, "native_bits") else None
    if group_size == "native" and needs is not None and needs <= bits:
        codes = source.codes(name)
        if codes.codes.shape != (n, k):
            raise ValueError(f"tensor {name!r} has shape {codes.codes.shape}, expected {(n, k)} for this config")
        return as_quantized(codes, bits)
    if group_size == "native":
        group_size = 32 if bits == 4 and k % 32 == 0 else None
    w = fetch(source, name, shape, "linear", np.float32)
    return requantized(w.T, bits, group_size)


def convert_quantized_attention_weights(
    config: ModelConfig, source: Mapping, scheme: str, group_size, dtype=jnp.float32, progress: bool = False
) -> dict:
    """`convert_attention_weights` with every block linear built straight as a QuantizedWeight of `scheme`
    (one tensor in float at a time, never the whole model); `group_size` as in `_linear_weight`."""
    bits = WEIGHT_BITS[scheme]
    shapes = param_shapes(config)
    names = {ours: LAYER_TENSORS[ours][0] for ours in LINEARS}
    hidden = {template.format(i=i) for template in names.values() for i in range(config.num_layers)}
    float_shapes = {**shapes, "layers": {k: v for k, v in shapes["layers"].items() if k not in LINEARS}}
    params = convert_weights(
        float_shapes,
        GLOBAL_TENSORS,
        LAYER_TENSORS,
        config.num_layers,
        TensorView(source, hidden=hidden),
        dtype,
        progress,
        tied=config.tie_word_embeddings,
        ignored_suffixes=_IGNORED_SUFFIXES,
    )
    bar = tqdm(total=len(hidden), desc="quantizing linears", unit="tensor", disable=not progress)
    for ours, template in names.items():
        per_layer = []
        for i in range(config.num_layers):
            per_layer.append(_linear_weight(source, template.format(i=i), shapes["layers"][ours][1:], bits, group_size))
            bar.update()
        params["layers"][ours] = jax.tree_util.tree_map(jnp.asarray, stack(per_layer))
    bar.close()
    return params
