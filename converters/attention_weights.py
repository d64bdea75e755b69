"""The mapping table from Hugging Face tensor names to the attention family's params, with strict checks.

A source is any mapping `name -> array` (a dict of numpy arrays, or a lazy reader over a file);
tensors are fetched one at a time so a lazy source never holds the whole checkpoint twice.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ssm_llm.config import ModelConfig
from ssm_llm.models.attention_lm import param_shapes

# our name -> (Hugging Face name, stored [out, in] so it must be transposed to our [in, out])
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
LAYER_TENSORS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "bo": ("model.layers.{i}.self_attn.o_proj.bias", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
    "b_gate": ("model.layers.{i}.mlp.gate_proj.bias", False),
    "b_up": ("model.layers.{i}.mlp.up_proj.bias", False),
    "b_down": ("model.layers.{i}.mlp.down_proj.bias", False),
}
# Buffers some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _fetch(source: Mapping, name: str, expected: tuple[int, ...], transpose: bool, dtype) -> np.ndarray:
    if name not in source:
        raise ValueError(f"checkpoint is missing tensor {name!r}")
    array = np.asarray(source[name])
    stored = expected[::-1] if transpose else expected
    if array.shape != stored:
        raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {stored} for this config")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.kind != "V":
        raise ValueError(f"tensor {name!r} has non-float dtype {array.dtype}")
    array = array.T if transpose else array
    return np.ascontiguousarray(array.astype(dtype))


def convert_attention_weights(config: ModelConfig, source: Mapping, dtype=jnp.float32,
                              progress: bool = False) -> dict:
    """Build the params pytree for `config` from Hugging Face-named tensors in `source`.

    Raises ValueError naming the tensor when one is missing, has the wrong shape, or is left unused.
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = param_shapes(config)
    consumed: set[str] = set()
    total = len(shapes) - 1 + len(shapes["layers"]) * config.num_layers
    bar = tqdm(total=total, desc="converting tensors", unit="tensor", disable=not progress)

    params: dict = {}
    for ours, shape in shapes.items():
        if ours == "layers":
            continue
        name, transpose = GLOBAL_TENSORS[ours]
        params[ours] = jnp.asarray(_fetch(source, name, shape, transpose, np_dtype))
        consumed.add(name)
        bar.update()

    layers = {}
    for ours, shape in shapes["layers"].items():
        template, transpose = LAYER_TENSORS[ours]
        stacked = np.empty(shape, np_dtype)
        for i in range(config.num_layers):
            name = template.format(i=i)
            stacked[i] = _fetch(source, name, shape[1:], transpose, np_dtype)
            consumed.add(name)
            bar.update()
        layers[ours] = jnp.asarray(stacked)
    params["layers"] = layers
    bar.close()

    head = GLOBAL_TENSORS["lm_head"][0]
    if config.tie_word_embeddings and head in source:
        # transformers' state_dict() lists the tied head; accept it only if it really is the embedding.
        if not np.array_equal(np.asarray(source[head]).astype(np_dtype), np.asarray(params["embed"])):
            raise ValueError(f"tie_word_embeddings is set but tensor {head!r} differs from the embedding")
        consumed.add(head)
    unused = sorted(n for n in source.keys() if n not in consumed and not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        shown = ", ".join(repr(n) for n in unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ValueError(f"checkpoint has {len(unused)} unused tensor(s) for this config: {shown}")
    return params
