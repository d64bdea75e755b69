"""Hadamard rotations for quantization, applied offline to a Mamba / Mamba-2 model's weights.

The residual stream x [.., H] is replaced by x' = x Q with Q an orthogonal (normalised) Hadamard matrix.
RMSNorm commutes with Q (it preserves the norm), so once each norm's weight is folded into the linear
that reads it, the model computes exactly the same logits:
  embed' = embed Q;  in_proj' = Q diag(norm) in_proj;  out_proj' = out_proj Q (bias b Q);
  lm_head' = Q diag(final_norm) lm_head (tied models are untied: the embedding is rotated too).
The out_proj input y [.., I] is rotated online (y Q_I, one fast Walsh-Hadamard transform per step) with
out_proj' = Q_I out_proj, so its outliers are spread before it is rounded (QuaRot / Quamba).

Sizes: n = 2^m uses the full Sylvester Hadamard H_n / sqrt(n). Any other n = 2^m * q (q odd) uses the
block-diagonal matrix of q Hadamard blocks of size 2^m — still orthogonal and symmetric (so the model
stays exact) but it only mixes channels within each block; an odd n gets the identity (no rotation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssm_llm.hadamard import block_hadamard as hadamard
from ssm_llm.hadamard import hadamard_block  # noqa: F401  (re-exported: the block size used)


@functools.partial(jax.jit, static_argnames="config")  # one program, not a few hundred eager ops
def fold_norms(params: dict, config) -> dict:
    """Fold every RMSNorm weight into the linear after it (no rotation): norms become ones, lm_head
    explicit (`params` in the stacked layout)."""
    layers = dict(params["layers"])
    layers["in_proj"] = layers["norm"].astype(jnp.float32)[:, :, None] * layers["in_proj"]
    layers["norm"] = jnp.ones_like(params["layers"]["norm"])
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return {
        **params,
        "final_norm": jnp.ones_like(params["final_norm"]),
        "lm_head": params["final_norm"].astype(jnp.float32)[:, None] * head,
        "layers": layers,
    }


@functools.partial(jax.jit, static_argnames="config")  # the eager butterflies compiled ~280 tiny programs
def rotate_model(params: dict, config) -> dict:
    """`fold_norms`, then rotate the residual stream and the out_proj input (see the module docstring).
    Run the result with online Hadamard before out_proj."""
    folded = fold_norms(params, config)
    layers = dict(folded["layers"])
    layers["in_proj"] = hadamard(layers["in_proj"], axis=1)
    layers["out_proj"] = hadamard(hadamard(layers["out_proj"], axis=2), axis=1)  # Q_I out_proj Q
    if "out_proj_b" in layers:
        layers["out_proj_b"] = hadamard(layers["out_proj_b"], axis=1)
    return {
        **folded,
        "embed": hadamard(folded["embed"], axis=1),
        "lm_head": hadamard(folded["lm_head"], axis=0),
        "layers": layers,
    }
