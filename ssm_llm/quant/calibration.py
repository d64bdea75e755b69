"""Calibration: run a float Mamba / Mamba-2 model on sample sequences and record, per layer, the
statistics every quantization point needs.

For each named activation of the block (`ops.act` names in `ssm_llm.models.mamba_mixers`) and each
linear's input (`<linear>_in`, taken after the online Hadamard for out_proj): the per-channel absmax
(`MinMaxObserver` over the last axis); for the SSM input x and the SSM state also the per-tensor
alpha-percentile of |x| (`PercentileObserver`) and, for x, the per-channel mean |x| that Quamba2's
sort-and-cluster orders channels by; for every linear the GPTQ Hessian 2 X^T X / n of its input.
The SSM state is the prefill's final state (absmax per head and channel for Mamba-2, per channel for
Mamba-1, reduced over the state axis).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ssm_llm.models.mamba_mixers import FLOAT_OPS, mamba1_mixer, mamba2_mixer
from ssm_llm.norm import rms_norm
from ssm_llm.quant import observers
from ssm_llm.quant.gptq import hessian
from ssm_llm.quant.rotation import hadamard
from ssm_llm.ssm_cache import init_ssm_cache
from ssm_llm.ssm_config import Mamba2Config

PERCENTILE_POINTS = ("x", "state")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-layer statistics (lists indexed by layer, numpy arrays).

    absmax[name][l]: float32 [C] per channel of the last axis ("state": [Hh, P] or [I]);
    percentile[name][l]: float32 scalar, the alpha-quantile of |x| (x and state; empty if alpha is None);
    mean_abs_x[l]: float32 [I]; hessian[linear][l]: float64 [K, K]; tokens: calibration tokens seen.
    """

    absmax: dict
    percentile: dict
    mean_abs_x: list
    hessian: dict
    tokens: int


class _RecordingOps:
    """Float block ops that also return every named activation and linear input they see."""

    def __init__(self, online_hadamard: bool):
        self.online_hadamard, self.records = online_hadamard, {}

    def act(self, name, x, p):
        del p
        self.records[name] = x
        return x

    def linear(self, name, x, p):
        if name == "out_proj" and self.online_hadamard:
            x = hadamard(x)
        self.records[f"{name}_in"] = x
        return FLOAT_OPS.linear(name, x, p)


def check_calibration_tokens(tokens, vocab_size: int) -> np.ndarray:
    """tokens as a numpy [N, T] array; ValueError if ragged, empty, not integers or outside the vocabulary."""
    try:
        tokens = np.asarray(tokens)
    except ValueError:  # rows of different lengths
        raise ValueError(
            "calibration tokens must be a rectangular [N, T] array of int ids (rows of one length), got ragged rows"
        ) from None
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"no calibration data: tokens must be a non-empty [N, T] array, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"calibration tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(
            f"calibration tokens must be integer ids that lie in [0, {vocab_size}), got range "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    return tokens


@functools.partial(jax.jit, static_argnames=("config", "online_hadamard"))
def _layer(p, x, config, online_hadamard):
    """One block from zero states on full rows: (next residual, {name: activation}, final SSM state)."""
    batch, steps, _ = x.shape
    mixer = mamba2_mixer if isinstance(config, Mamba2Config) else mamba1_mixer
    empty = init_ssm_cache(dataclasses.replace(config, num_layers=1), batch)
    ops = _RecordingOps(online_hadamard)
    counts = jnp.full((batch,), steps, jnp.int32)
    out, _, state = mixer(
        config,
        "xla",
        p,
        rms_norm(x, p["norm"], config.layer_norm_epsilon),
        empty.conv_state[0],
        empty.ssm_state[0],
        counts,
        ops,
    )
    return x + out, ops.records, state


def calibrate(
    params: dict,
    config,
    tokens,
    *,
    online_hadamard: bool = False,
    alpha: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Calibration:
    """Statistics of the float model `params` (stacked layout, `lm_head` optional) on `tokens: [N, T]`.

    online_hadamard: the model's out_proj expects a Hadamard-rotated input (`rotate_model`).
    alpha: also record the alpha-percentile of |x| and |state| (None: skip).
    """
    tokens = check_calibration_tokens(tokens, config.vocab_size)
    num_layers = config.num_layers
    layer_params = [jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"]) for i in range(num_layers)]
    minmax, pct, hess, abs_sum = {}, {}, {}, [0.0] * num_layers
    rows = 0
    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, desc="calibration", disable=not progress, leave=False):
        chunk = jnp.asarray(tokens[start : start + batch_size], jnp.int32)
        x, rows_here = params["embed"][chunk], chunk.shape[0] * chunk.shape[1]
        for layer, p in enumerate(layer_params):
            x, records, state = _layer(p, x, config, online_hadamard)
            records = {**records, "state": jnp.moveaxis(state, -1, 0)}  # absmax over the state axis too
            for name, value in records.items():
                key = (name, layer)
                shape = value.shape[2:] if name == "state" else value.shape[-1:]  # state: [N, B, *shape]
                obs = minmax.get(key) or observers.MinMaxObserver.create(shape)
                minmax[key] = observers.update(obs, value)
                if alpha is not None and name in PERCENTILE_POINTS:
                    obs = pct.get(key) or observers.PercentileObserver.create(alpha)
                    pct[key] = observers.update(obs, value)
                if name.endswith("_in"):
                    h = hessian(np.asarray(value))
                    hess[key] = hess.get(key, 0.0) + h * rows_here
            abs_sum[layer] = abs_sum[layer] + np.asarray(jnp.sum(jnp.abs(records["x"]), axis=(0, 1)), np.float64)
        rows += rows_here

    def per_layer(table, fn):
        names = sorted({name for name, _ in table})
        return {name: [fn(table[(name, layer)]) for layer in range(num_layers)] for name in names}

    return Calibration(
        absmax=per_layer(minmax, lambda o: np.asarray(observers.clip_value(o), np.float32)),
        percentile=per_layer(pct, lambda o: np.float32(observers.clip_value(o))),
        mean_abs_x=[(s / rows).astype(np.float32) for s in abs_sum],
        hessian=per_layer(hess, lambda h: h / rows),
        tokens=rows,
    )
