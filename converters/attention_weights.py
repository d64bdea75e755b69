"""The mapping table from Hugging Face tensor names to the attention family's params."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from converters.weight_table import convert_weights
from ssm_llm.config import ModelConfig
from ssm_llm.models.attention_lm import param_shapes

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


def convert_attention_weights(config: ModelConfig, source: Mapping, dtype=jnp.float32, progress: bool = False) -> dict:
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
    )
