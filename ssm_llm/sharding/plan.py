"""Bytes per device of a model laid out on a mesh by the rules: weights, cache, and an estimate of the
largest activations of a prefill, computed from shapes alone (nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ssm_llm.cache import cache_shapes as kv_cache_shapes
from ssm_llm.config import ModelConfig
from ssm_llm.memory import format_bytes
from ssm_llm.models import family_module
from ssm_llm.sharding.place import cache_specs, param_specs


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes held by each device. `activations` is an estimate: a prefill's logits plus the widest
    intermediate of one layer (the rest of XLA's temporaries come on top)."""

    mesh: dict
    weights: int
    cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations

    def __str__(self) -> str:
        shape = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        parts = ", ".join(f"{k} {format_bytes(getattr(self, k))}" for k in ("weights", "cache", "activations"))
        return f"per device on {shape}: {parts}; total {format_bytes(self.total)}"


def _per_device(tree, specs, mesh) -> int:
    leaves = jax.tree.leaves(tree)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    total = 0
    for leaf, spec in zip(leaves, flat_specs, strict=True):
        shape = [
            size // (mesh.shape[axis] if axis else 1)
            for size, axis in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim, strict=False)
        ]
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan(config, mesh, batch: int, max_len: int, dtype=jnp.float32, prefill_tokens: int | None = None) -> MemoryPlan:
    """Bytes per device for `config`'s weights (in `dtype`), a cache of `batch` x `max_len`, and a prefill
    of `prefill_tokens` (default `max_len`) tokens per sequence, on `mesh` (a Mesh or AbstractMesh)."""
    module = family_module(config)
    params = jax.eval_shape(lambda: module.init_params(config, jax.random.key(0), dtype))
    if isinstance(config, ModelConfig):  # shapes only: init_cache refuses a cache larger than this host's memory
        cache = kv_cache_shapes(config, batch, max_len, dtype)
    else:
        cache = jax.eval_shape(lambda: module.init_cache(config, batch, max_len, dtype))
    weights = _per_device(params, param_specs(params, config, mesh), mesh)
    cache_bytes = _per_device(cache, cache_specs(cache, config, mesh), mesh)
    dp, tp = mesh.shape.get("data", 1), mesh.shape.get("model", 1)
    tokens = (batch // dp) * (prefill_tokens or max_len)
    if isinstance(config, ModelConfig):
        widest = max(config.q_size + 2 * config.kv_size, 2 * config.intermediate_size) // tp
    else:
        widest = (config.intermediate_size * 2 + config.state_size * 2) // tp
    itemsize = jnp.dtype(dtype).itemsize
    activations = tokens * (config.vocab_size // tp) * 4 + tokens * (widest + 2 * config.hidden_size) * itemsize
    return MemoryPlan(dict(mesh.shape), weights, cache_bytes, activations)
