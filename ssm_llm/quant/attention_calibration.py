"""Calibration of an attention model, one layer at a time: what each group of linear layers reads.

A block's seven linears read four activations ("sites"):
  attn_in  = RMSNorm(x) -> wq, wk, wv;     o_in    = attention output -> wo;
  mlp_in   = RMSNorm(x') -> w_gate, w_up;  down_in = silu(gate) * up -> w_down.
`layer_statistics` runs one block on a calibration batch and returns, per site, the absolute maximum of
every input channel (SmoothQuant's scales) and, if asked, the sum of x^T x over all tokens (GPTQ's
Hessian). The caller walks the layers itself, so each layer can be changed (smoothed, quantized) before
the next layer's input is computed from it (GPTQ's sequential order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import flash_attention
from ssm_llm.config import ModelConfig
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.models.attention_lm import finish_block_with_inputs, project_qkv
from ssm_llm.models.lm_head import embed_tokens
from ssm_llm.norm import rms_norm
from ssm_llm.rope import apply_rope, inverse_frequencies, rope_tables

SITES = {"attn_in": ("wq", "wk", "wv"), "o_in": ("wo",), "mlp_in": ("w_gate", "w_up"), "down_in": ("w_down",)}
SITE_OF = {name: site for site, names in SITES.items() for name in names}  # linear -> the site it reads


def check_calibration(tokens, vocab_size: int) -> jax.Array:
    """Token ids for calibration: an int array [B, T] (or [T]) of real text, every id in the vocabulary,
    no padding (every position is a real token) -> int32 [B, T]."""
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"calibration must be a non-empty integer array of token ids [B, T], got {arr.dtype} {arr.shape}"
        )
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}), got [{arr.min()}, {arr.max()}]")
    return jnp.asarray(arr, jnp.int32)


def as_float32(layer: dict) -> dict:
    """A layer's weights in float32 (the calibration walks compute in float32 whatever the model's dtype)."""
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), layer)


def walk_layers(params: dict, config: ModelConfig, tokens: jax.Array, hessians: bool = False):
    """Yield (layer input x, its output, `layer_statistics`) for every layer of the unchanged model in float32 on
    `tokens` [B, T] (checked token ids), each layer's output the next one's input."""
    x = embed_tokens(params, config, tokens).astype(jnp.float32)
    for i, layer in enumerate(unstack_layers(params)["layers"]):
        y, stats = layer_statistics(config, as_float32(layer), x, config.layer_windows[i], hessians)
        yield x, y, stats
        x = y


@functools.partial(jax.jit, static_argnames=("config", "window", "hessians"))
def layer_statistics(config: ModelConfig, layer: dict, x: jax.Array, window: int, hessians: bool = False):
    """One block on x: [B, T, H] (every position real, positions 0..T-1) -> (its output [B, T, H],
    {site: {"amax": [C], "xtx": [C, C] (only with `hessians`)}}), float32 statistics over all tokens."""
    batch, steps, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (batch, steps))
    cos, sin = rope_tables(positions, inverse_frequencies(config.rope, config.head_dim))
    q, k, v = project_qkv(config, layer, x)
    attn = flash_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window, impl="xla")
    out, inputs = finish_block_with_inputs(config, layer, x, attn)
    inputs["attn_in"] = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    stats = {}
    for site, value in inputs.items():
        rows = value.reshape(-1, value.shape[-1]).astype(jnp.float32)
        stats[site] = {"amax": jnp.max(jnp.abs(rows), axis=0)}
        if hessians:
            stats[site]["xtx"] = jnp.einsum("ni,nj->ij", rows, rows, precision=jax.lax.Precision.HIGHEST)
    return out, stats
