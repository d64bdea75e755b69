"""State-space language models: Mamba-1 and Mamba-2 stacks of residual RMSNorm -> mixer blocks.

Pure functions over a params dict, with the same two layer layouts as the attention family
(`ssm_llm.layer_layout`). Linear weights are stored `[in, out]`.

params = {
  "embed": [V, H], "final_norm": [H], "lm_head": [H, V] (untied models only),
  "layers": {
    "norm": [L, H], "in_proj": [L, H, P_in], "in_proj_b" (use_bias), "conv_w": [L, C, K],
    "conv_b": [L, C] (use_conv_bias), "out_proj": [L, I, H], "out_proj_b" (use_bias), "D", "A_log",
    Mamba-1: "x_proj": [L, I, R + 2N], "dt_proj": [L, R, I], "dt_proj_b": [L, I], A_log/D: [L, I, N]/[L, I]
    Mamba-2: "dt_bias": [L, Hh], "gated_norm": [L, I], A_log/D: [L, Hh]
  },
}
with P_in = 2I (Mamba-1) or I + C + Hh (Mamba-2, C = I + 2 G N the conv channels).
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.layer_layout import run_layers_with_states
from ssm_llm.models.lm_head import embed_tokens
from ssm_llm.models.mamba_mixers import mamba1_mixer, mamba2_mixer
from ssm_llm.models.registry import Family, register
from ssm_llm.norm import rms_norm
from ssm_llm.ssm_cache import SSMCache, init_ssm_cache
from ssm_llm.ssm_config import Mamba2Config, MambaConfig
from ssm_llm.validation import as_int


def param_shapes(config: MambaConfig | Mamba2Config) -> dict:
    """The shape of every parameter, as a pytree matching `params`."""
    L, H, I, N, K = (  # noqa: E741 (the docstring's shape letters)
        config.num_layers,
        config.hidden_size,
        config.intermediate_size,
        config.state_size,
        config.conv_kernel,
    )
    if isinstance(config, Mamba2Config):
        C, heads = config.conv_dim, config.num_heads
        layers = {
            "in_proj": (L, H, I + C + heads),
            "dt_bias": (L, heads),
            "A_log": (L, heads),
            "D": (L, heads),
            "gated_norm": (L, I),
        }
    else:
        C, R = I, config.time_step_rank
        layers = {
            "in_proj": (L, H, 2 * I),
            "x_proj": (L, I, R + 2 * N),
            "dt_proj": (L, R, I),
            "dt_proj_b": (L, I),
            "A_log": (L, I, N),
            "D": (L, I),
        }
    layers.update(norm=(L, H), conv_w=(L, C, K), out_proj=(L, I, H))
    if config.use_conv_bias:
        layers["conv_b"] = (L, C)
    if config.use_bias:
        layers.update(in_proj_b=(L, layers["in_proj"][2]), out_proj_b=(L, H))
    shapes = {"embed": (config.vocab_size, H), "final_norm": (H,), "layers": layers}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (H, config.vocab_size)
    return shapes


def init_params(config: MambaConfig | Mamba2Config, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters with Mamba's structured SSM initialisation: A = -[1..N] (Mamba-1, per channel)
    or -[1..H] (Mamba-2, per head), D = 1, dt biases giving dt log-uniform in [1e-3, 0.1]; other
    weights normal (std 0.02), norms near 1."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys, strict=True):
        name = path[-1].key
        if name == "A_log":
            ramp = np.arange(1, shape[-1] + 1, dtype=np.float32)
            out.append(jnp.broadcast_to(jnp.log(ramp), shape).astype(dtype))
        elif name == "D":
            out.append(jnp.ones(shape, dtype))
        elif name in ("dt_bias", "dt_proj_b"):
            dt = jnp.exp(jax.random.uniform(k, shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            out.append((dt + jnp.log(-jnp.expm1(-dt))).astype(dtype))  # inverse softplus
        elif "norm" in name:
            out.append(jnp.ones(shape, dtype) + 0.1 * jax.random.normal(k, shape, dtype))
        else:
            out.append(0.02 * jax.random.normal(k, shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def init_cache(config: MambaConfig | Mamba2Config, batch: int, max_len: int, dtype=jnp.float32) -> SSMCache:
    """Zero states for `batch` sequences; their size does not depend on the length (`max_len` is
    validated, then unused)."""
    as_int("max_len", max_len, 1)
    return init_ssm_cache(config, batch, dtype)


_MIXERS = {MambaConfig: mamba1_mixer, Mamba2Config: mamba2_mixer}


def hidden_states(
    params: dict,
    config: MambaConfig | Mamba2Config,
    tokens: jax.Array,
    cache: SSMCache,
    token_counts: jax.Array,
    impl: str = "auto",
    cache_is_empty: bool = False,
    sequence_parallel=None,
) -> tuple[jax.Array, SSMCache]:
    """Run the block stack on `tokens: [B, T]` continuing from `cache`'s states.

    token_counts: [B] real tokens per row (the rest is right padding). `cache_is_empty` is accepted
    for the protocol (an empty SSM cache needs no special path). `sequence_parallel` (static, Mamba-2 only):
    an `ssm_llm.sharding.SequenceParallel` splitting the SSD scan of a prefill over its mesh axis.
    Returns the final-normed hidden states `[B, T, H]` and the cache advanced by `token_counts`.
    """
    del cache_is_empty
    mixer = _MIXERS[type(config)]
    if sequence_parallel is not None:
        if type(config) is not Mamba2Config:
            raise ValueError(
                "sequence_parallel splits Mamba-2's SSD scan; Mamba-1's selective scan has no sequence-parallel "
                "form here yet"
            )
        mixer = functools.partial(mamba2_mixer, sequence_parallel=sequence_parallel)
    return run_blocks(
        params,
        config,
        tokens,
        cache,
        token_counts,
        lambda p, h, conv, ssm: mixer(config, impl, p, h, conv, ssm, token_counts),
    )


def run_blocks(
    params: dict,
    config: MambaConfig | Mamba2Config,
    tokens: jax.Array,
    cache: SSMCache,
    token_counts: jax.Array,
    layer_mixer,
) -> tuple[jax.Array, SSMCache]:
    """The residual stack of `hidden_states` with the mixer supplied:
    `layer_mixer(layer_params, normed h [B, T, H], conv_state, ssm_state) -> (out, new conv, new ssm)`
    (states as the cache stores them). Returns final-normed hidden states and the advanced cache."""

    def layer(x, layer_inputs, state):
        p, _ = layer_inputs
        conv, ssm = state
        out, new_conv, new_ssm = layer_mixer(p, rms_norm(x, p["norm"], config.layer_norm_epsilon), conv, ssm)
        return x + out, (new_conv.astype(conv.dtype), new_ssm.astype(ssm.dtype))

    x, (conv_all, ssm_all) = run_layers_with_states(
        layer, embed_tokens(params, config, tokens), (cache.conv_state, cache.ssm_state), params["layers"]
    )
    h = rms_norm(x, params["final_norm"], config.layer_norm_epsilon)
    return h, SSMCache(conv_state=conv_all, ssm_state=ssm_all, lengths=cache.lengths + token_counts)


for _config_type in (MambaConfig, Mamba2Config):
    register(_config_type, Family("mamba", sys.modules[__name__], SSMCache, tree_verifier="ssm"))
