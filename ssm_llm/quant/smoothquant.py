"""SmoothQuant (Xiao et al., 2023) for attention models: move activation outliers into the weights.

A linear reads x [.., C] whose few outlier channels make per-token int8 rounding coarse for every other
channel. With a per-channel scale s > 0, x W = (x / s) (s W) exactly, and
    s_j = amax(x_j)^alpha / amax(W_j,:)^(1 - alpha)        (clamped to >= 1e-5; 1 where either is 0)
balances the two (alpha = 0.5 in the paper). The division by s is folded into whatever produced x, so
the smoothed float model computes the same logits:
  attn_in  (RMSNorm -> wq, wk, wv):      attn_norm / s;   wq, wk, wv rows * s (one s for all three);
  mlp_in   (RMSNorm -> w_gate, w_up):    mlp_norm / s;    w_gate, w_up rows * s;
  down_in  (silu(gate) * up -> w_down):  w_up columns (and b_up) / s;  w_down rows * s;
  o_in     (attention output -> wo):     wv columns (and bv) / s, since attention mixes value rows;
           with grouped-query attention a kv head feeds several query heads, so s is shared by them.
"""

from __future__ import annotations

import jax.numpy as jnp

from ssm_llm.config import ModelConfig


def migration_scales(act_amax, w_amax, alpha: float) -> jnp.ndarray:
    """Per-channel maxima of |x| and of |W|'s rows reading it (both [C]) -> s [C] (see the module
    docstring)."""
    act_amax, w_amax = jnp.asarray(act_amax, jnp.float32), jnp.asarray(w_amax, jnp.float32)
    ok = (act_amax > 0) & (w_amax > 0)
    s = jnp.where(ok, act_amax**alpha / jnp.where(ok, w_amax, 1.0) ** (1.0 - alpha), 1.0)
    return jnp.maximum(s, 1e-5)


def _row_amax(*weights) -> jnp.ndarray:
    """max |w[j, :]| over every given [C, N] weight -> [C]."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(w), axis=-1) for w in weights]), axis=0)


def smooth_layer(layer: dict, config: ModelConfig, amax: dict, alpha: float) -> tuple[dict, dict]:
    """One block's params (unstacked) and its calibration maxima {site: [C]} -> (smoothed params, the
    scales {site: [C]} the sites' inputs were divided by)."""
    out = dict(layer)
    s_attn = migration_scales(amax["attn_in"], _row_amax(layer["wq"], layer["wk"], layer["wv"]), alpha)
    out["attn_norm"] = layer["attn_norm"] / s_attn
    for name in ("wq", "wk", "wv"):
        out[name] = layer[name] * s_attn[:, None]

    s_mlp = migration_scales(amax["mlp_in"], _row_amax(layer["w_gate"], layer["w_up"]), alpha)
    out["mlp_norm"] = layer["mlp_norm"] / s_mlp
    out["w_gate"] = layer["w_gate"] * s_mlp[:, None]

    s_down = migration_scales(amax["down_in"], _row_amax(layer["w_down"]), alpha)
    out["w_up"] = layer["w_up"] * s_mlp[:, None] / s_down[None, :]
    if "b_up" in layer:
        out["b_up"] = layer["b_up"] / s_down
    out["w_down"] = layer["w_down"] * s_down[:, None]

    # o_in: channel (query head h, d) comes from value channel (kv head h // rep, d); one scale per kv
    # channel, from the maxima over the query heads it feeds.
    kv, rep, dim = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    a_o = jnp.max(jnp.asarray(amax["o_in"]).reshape(kv, rep, dim), axis=1)
    w_o = jnp.max(_row_amax(layer["wo"]).reshape(kv, rep, dim), axis=1)
    t = migration_scales(a_o, w_o, alpha).reshape(-1)
    out["wv"] = out["wv"] / t[None, :]
    if "bv" in layer:
        out["bv"] = layer["bv"] / t
    s_o = jnp.broadcast_to(t.reshape(kv, 1, dim), (kv, rep, dim)).reshape(-1)
    out["wo"] = layer["wo"] * s_o[:, None]
    return out, {"attn_in": s_attn, "o_in": s_o, "mlp_in": s_mlp, "down_in": s_down}
