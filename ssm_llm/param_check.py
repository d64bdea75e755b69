"""Params checked against their config before they reach a compiled program.

A mismatch (a 50-row embedding under a 64-token config, Mamba params under an attention config, an
edited checkpoint config) otherwise runs to garbage, because gathers clamp out-of-range rows, or crashes
deep inside XLA with a shape error that names no parameter. Shapes and dtypes are static, so the check
also runs on traced params under `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from pallas_kernels.cpu_int8_dot import BlockedInt8Weight
from pallas_kernels.quantized_matmul import QuantizedWeight
from pallas_kernels.quantized_matmul.weights import unpacked_rows
from ssm_llm.models import family_module

# Marks a subtree of `param_shapes` whose layout its family validates itself (quantization scales).
ANY = "any"


def check_params(params, config) -> None:
    """Raise ValueError naming the first parameter whose presence, shape or dtype does not match
    `family.param_shapes(config)`, in either layer layout (stacked or a list of per-layer dicts)."""
    expected = family_module(config).param_shapes(config)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays (as converters.load returns), got {type(params).__name__}")
    _check_dict(params, expected, "params", type(config).__name__)


def _check_dict(node, spec: dict, path: str, owner: str) -> None:
    if not isinstance(node, Mapping):
        raise ValueError(f"{path} must be a dict, got {type(node).__name__}")
    missing = [k for k in spec if k not in node]
    extra = [k for k in node if k not in spec]
    if missing or extra:
        raise ValueError(
            f"{path} does not match the {owner}: missing {sorted(missing)}, unexpected {sorted(extra)} "
            f"(params of another model family or config?)"
        )
    for key, sub in spec.items():
        where = f"{path}[{key!r}]"
        if sub == ANY:
            continue
        if key == "layers" and isinstance(node[key], (list, tuple)):
            _check_layer_list(node[key], sub, where, owner)
        elif isinstance(sub, dict):
            _check_dict(node[key], sub, where, owner)
        else:
            _check_leaf(node[key], sub, where, owner)


def _check_layer_list(layers, spec: dict, path: str, owner: str) -> None:
    count = next(s[0] for s in spec.values() if s != ANY)
    if len(layers) != count:
        raise ValueError(f"{path} holds {len(layers)} layers but the {owner} has num_layers={count}")
    per_layer = {k: (s if s == ANY else s[1:]) for k, s in spec.items()}
    for i, layer in enumerate(layers):
        _check_dict(layer, per_layer, f"{path}[{i}]", owner)


def _check_leaf(x, shape: tuple, path: str, owner: str) -> None:
    if isinstance(x, BlockedInt8Weight):
        got, ok_dtype, kind = (*x.values.shape[:-3], x.k, x.n), x.values.dtype == jnp.int8, "int8 codes"
    elif isinstance(x, QuantizedWeight):
        rows = unpacked_rows(x.bits, x.values.shape[-2])
        got, ok_dtype = (*x.values.shape[:-2], rows, x.values.shape[-1]), jnp.issubdtype(x.values.dtype, jnp.integer)
        kind = "integer codes"
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
        got, ok_dtype, kind = tuple(x.shape), jnp.issubdtype(x.dtype, jnp.floating), "a floating dtype"
    else:
        raise ValueError(f"{path} must be an array, got {type(x).__name__}")
    if got != tuple(shape):
        raise ValueError(f"{path} has shape {got}, but the {owner} needs {tuple(shape)}")
    if not ok_dtype:
        dtype = x.values.dtype if isinstance(x, (QuantizedWeight, BlockedInt8Weight)) else x.dtype
        raise ValueError(f"{path} has dtype {dtype}; expected {kind}")
