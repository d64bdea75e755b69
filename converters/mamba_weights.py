"""The mapping table from Hugging Face (and original `state-spaces`) Mamba / Mamba-2 tensor names to params.

The original `mamba_ssm` checkpoints name the embedding `backbone.embedding.weight`; transformers
renames it to `backbone.embeddings.weight` on load, and so do we. Everything else is shared.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from converters.weight_table import TensorView, convert_weights
from ssm_llm.models.mamba_lm import param_shapes
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

GLOBAL_TENSORS = {
    "embed": ("backbone.embeddings.weight", "same"),
    "final_norm": ("backbone.norm_f.weight", "same"),
    "lm_head": ("lm_head.weight", "linear"),
}
_MIXER = "backbone.layers.{i}.mixer."
LAYER_TENSORS = {
    "norm": ("backbone.layers.{i}.norm.weight", "same"),
    "in_proj": (_MIXER + "in_proj.weight", "linear"),
    "in_proj_b": (_MIXER + "in_proj.bias", "same"),
    "conv_w": (_MIXER + "conv1d.weight", "conv"),
    "conv_b": (_MIXER + "conv1d.bias", "same"),
    "out_proj": (_MIXER + "out_proj.weight", "linear"),
    "out_proj_b": (_MIXER + "out_proj.bias", "same"),
    "A_log": (_MIXER + "A_log", "same"),
    "D": (_MIXER + "D", "same"),
    # Mamba-1
    "x_proj": (_MIXER + "x_proj.weight", "linear"),
    "dt_proj": (_MIXER + "dt_proj.weight", "linear"),
    "dt_proj_b": (_MIXER + "dt_proj.bias", "same"),
    # Mamba-2
    "dt_bias": (_MIXER + "dt_bias", "same"),
    "gated_norm": (_MIXER + "norm.weight", "same"),
}
_ORIGINAL_NAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def convert_mamba_weights(
    config: MambaConfig | Mamba2Config,
    source: Mapping,
    dtype=jnp.float32,
    progress: bool = False,
    on_host: bool = False,
) -> dict:
    """Build the params pytree for `config` from Hugging Face- or state-spaces-named tensors (strict)."""
    if all(name in source for name in (*_ORIGINAL_NAMES, *_ORIGINAL_NAMES.values())):
        raise ValueError("checkpoint holds both 'backbone.embedding.weight' and 'backbone.embeddings.weight'")
    return convert_weights(
        param_shapes(config),
        GLOBAL_TENSORS,
        LAYER_TENSORS,
        config.num_layers,
        TensorView(source, _ORIGINAL_NAMES),
        dtype,
        progress,
        tied=config.tie_word_embeddings,
        on_host=on_host,
    )
