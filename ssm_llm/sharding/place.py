"""Placing params and caches on a device mesh by the rules of `ssm_llm.sharding.rules`."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels.cpu_int8_dot import BlockedInt8Weight
from pallas_kernels.dfloat11 import DFloat11Weight
from pallas_kernels.quantized_matmul import QuantizedWeight
from pallas_kernels.quantized_matmul.weights import KERNEL_BITS
from ssm_llm.bitstack_weight import BitStackWeight
from ssm_llm.cache import KVCache
from ssm_llm.config import ModelConfig
from ssm_llm.sharding import rules
from ssm_llm.ssm_cache import SSMCache
from ssm_llm.ssm_config import Mamba2Config, MambaConfig


def auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with every axis `AxisType.Auto`: the arrays placed on it are laid out by XLA's SPMD partitioner
    inside `jit`, so `forward` runs unchanged. (`jax.make_mesh` makes Explicit axes by default, under which
    every gather and product would need its output sharding spelled out.)"""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def check_axes(mesh: Mesh, sizes: dict | None = None, **axes: str | None) -> None:
    """Raise ValueError unless each named mesh axis in `axes` (None: unused) exists and, for an axis whose
    keyword is in `sizes` (`{keyword: (count, what)}`), its size divides `count` (`what` names it)."""
    for name, axis in axes.items():
        if axis is None:
            continue
        if axis not in mesh.shape:
            raise ValueError(f"{name}: mesh has no axis {axis!r} (axes: {', '.join(mesh.axis_names)})")
        count, what = (sizes or {}).get(name, (0, ""))
        if count % mesh.shape[axis]:
            raise ValueError(f"{name} {axis!r} of size {mesh.shape[axis]} does not divide the {count} {what}")


def _base(config):
    """The float model's config of a Quamba-quantized one (a config with a `base`), else `config`."""
    base = getattr(config, "base", None)
    return base if type(base) in (MambaConfig, Mamba2Config) else config


def _layer_rules(config) -> dict:
    if _base(config) is not config:  # Quamba: the float layout, plus the static activation scales replicated
        return {**_layer_rules(_base(config)), "scales": rules.REPLICATED}
    if type(config) is ModelConfig:
        return rules.ATTENTION_LAYER
    if type(config) is MambaConfig:
        return rules.MAMBA1_LAYER
    if type(config) is Mamba2Config:
        return rules.MAMBA2_LAYER
    raise TypeError(
        f"sharding supports ModelConfig, MambaConfig and Mamba2Config models and their quantized forms, "
        f"not {type(config).__name__}"
    )


def split_sizes(config) -> dict[str, int]:
    """The counts a mesh axis must divide, per logical axis: whole heads, channels, vocabulary rows."""
    _layer_rules(config)
    config = _base(config)
    sizes = {"vocab": config.vocab_size, "inner": config.intermediate_size, "embed_rows": config.hidden_size}
    if isinstance(config, ModelConfig):
        sizes.update(heads=config.num_heads, kv_heads=config.num_kv_heads, mlp=config.intermediate_size)
        del sizes["inner"], sizes["embed_rows"]
    elif isinstance(config, Mamba2Config):
        sizes["ssm_heads"] = config.num_heads
    return sizes


def _mesh_size(mesh: Mesh, logical: str | None) -> tuple[str | None, int]:
    axis = rules.AXIS_RULES.get(logical) if logical else None
    if axis is None or axis not in mesh.shape:
        return None, 1
    return axis, mesh.shape[axis]


def check_mesh(config, mesh: Mesh, batch: int | None = None) -> None:
    """Raise ValueError, naming the sizes and the mesh sizes that work, unless every head, channel and
    vocabulary count (and `batch`, over "data") splits evenly over its mesh axis."""
    sizes = split_sizes(config) | ({"batch": batch} if batch is not None else {})
    for logical, size in sizes.items():
        axis, n = _mesh_size(mesh, logical)
        if n > 1 and size % n:
            model_sizes = [v for k, v in sizes.items() if rules.AXIS_RULES.get(k) == axis]
            works = [d for d in range(1, max(model_sizes) + 1) if all(s % d == 0 for s in model_sizes)]
            names = ", ".join(f"{k}={v}" for k, v in sizes.items() if rules.AXIS_RULES.get(k) == axis)
            raise ValueError(
                f"mesh axis {axis!r} of size {n} does not divide {logical} ({size}); the {axis!r} axis must "
                f"divide {names}: sizes {works}"
            )


def _spec(logical_axes, mesh: Mesh) -> PartitionSpec:
    return PartitionSpec(*(_mesh_size(mesh, name)[0] for name in logical_axes))


def _weight_spec(logical_axes: tuple, leaf_shape: tuple, mesh: Mesh, stacked: bool) -> PartitionSpec:
    axes = ((None,) if stacked else ()) + tuple(logical_axes)
    if len(axes) != len(leaf_shape):
        raise ValueError(f"expected {len(axes)} dimensions, got shape {leaf_shape}")
    return _spec(axes, mesh)


def _quantized_spec(spec: PartitionSpec, leaf_shape: tuple, mesh: Mesh) -> PartitionSpec:
    """A quantized weight's codes, scales and offsets share the float weight's [.., K, N] dims; a dim of
    size 1 (one scale per output channel) stays whole."""
    return PartitionSpec(*(None if size == 1 else axis for axis, size in zip(spec, leaf_shape, strict=True)))


def param_specs(params: dict, config, mesh: Mesh) -> dict:
    """The `PartitionSpec` of every leaf of `params` (stacked or unstacked layers, float or quantized
    linears), as a pytree like `params`. A leaf the rules do not know is a ValueError naming it."""
    layer_rules = _layer_rules(config)
    check_mesh(config, mesh)

    def place(logical_axes, leaf, stacked, where):
        if logical_axes is rules.REPLICATED:  # a whole subtree (Quamba's activation scales)
            return jax.tree.map(lambda _: PartitionSpec(), leaf)
        # A Huffman stream or packed sign bits cannot be cut along the weight's axes: replicated.
        if isinstance(leaf, (DFloat11Weight, BitStackWeight)):
            return jax.tree.map(lambda _: PartitionSpec(), leaf)
        if isinstance(leaf, BlockedInt8Weight):
            raise ValueError(
                f"params{where} is in the CPU kernel's blocked layout, which is not sharded: give the plain layout "
                "(ssm_llm.int8_blocks.unblock_int8_weights(params))"
            )
        if isinstance(leaf, QuantizedWeight):
            if leaf.bits not in KERNEL_BITS:  # bit planes: 8 rows of K in `bits` stored rows, so K stays whole
                logical_axes = (None, *tuple(logical_axes)[1:])
            float_spec = _spec(((None,) if stacked else ()) + tuple(logical_axes), mesh)
            return dataclasses.replace(
                leaf,
                **{
                    name: _quantized_spec(float_spec, getattr(leaf, name).shape, mesh)
                    for name in ("values", "scales", "offsets")
                    if getattr(leaf, name) is not None
                },
            )
        try:
            return _weight_spec(logical_axes, leaf.shape, mesh, stacked)
        except ValueError as err:
            raise ValueError(f"params{where}: {err}") from None

    def layer(layer_params: dict, stacked: bool, where: str) -> dict:
        out = {}
        for name, leaf in layer_params.items():
            if name not in layer_rules:
                raise ValueError(f"params{where}[{name!r}]: no sharding rule for this {type(config).__name__} leaf")
            out[name] = place(layer_rules[name], leaf, stacked, f"{where}[{name!r}]")
        return out

    specs = {}
    for name, value in params.items():
        if name == "layers":
            if isinstance(value, (list, tuple)):
                specs[name] = [layer(p, False, f"['layers'][{i}]") for i, p in enumerate(value)]
            else:
                specs[name] = layer(value, True, "['layers']")
        elif name in rules.GLOBAL:
            # An int8 embedding is stored as the output projection [H, V]: it splits like lm_head.
            axes = rules.GLOBAL["lm_head" if name == "embed" and isinstance(value, QuantizedWeight) else name]
            specs[name] = place(axes, value, False, f"[{name!r}]")
        else:
            raise ValueError(f"params[{name!r}]: no sharding rule for this {type(config).__name__} leaf")
    return specs


def _placed(leaves, specs, mesh: Mesh, what: str) -> list:
    """Each leaf put on `mesh` by its spec, after checking each sharded dimension splits evenly."""
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    mesh = auto_mesh(mesh)
    out = []
    for (path, x), spec in zip(leaves, flat_specs, strict=True):
        for dim, (size, axis) in enumerate(zip(x.shape, spec, strict=False)):
            if axis is not None and size % mesh.shape[axis]:
                raise ValueError(
                    f"{what}{jax.tree_util.keystr(path)}: dimension {dim} ({size}) does not split over mesh axis "
                    f"{axis!r} of size {mesh.shape[axis]}"
                )
        out.append(_global_array(x, NamedSharding(mesh, spec)))
    return out


def _global_array(x, sharding: NamedSharding) -> jax.Array:
    """`x` (the same full value in every process) as one array laid out by `sharding`: each process sends
    its own devices their slices only, so this also builds arrays over several processes' devices."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_params(params: dict, config, mesh: Mesh) -> dict:
    """`params` placed on `mesh` by the rules (`param_specs`): every leaf a `NamedSharding`."""
    specs = param_specs(params, config, mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, _placed(leaves, specs, mesh, "params"))


def cache_specs(cache, config, mesh: Mesh):
    """The `PartitionSpec` of every leaf of a dense `KVCache` or an `SSMCache`, as a cache pytree."""
    _layer_rules(config)
    if isinstance(cache, KVCache):
        table = rules.KV_CACHE
    elif isinstance(cache, SSMCache):
        table = rules.MAMBA2_CACHE if isinstance(_base(config), Mamba2Config) else rules.MAMBA1_CACHE
    else:
        raise TypeError(f"sharding supports KVCache and SSMCache, not {type(cache).__name__} (compressed caches)")
    check_mesh(config, mesh, batch=cache.lengths.shape[0])
    fields = {name: _spec(axes, mesh) for name, axes in table.items()}
    return dataclasses.replace(cache, lengths=_spec(rules.LENGTHS, mesh), **fields)


def shard_cache(cache, config, mesh: Mesh):
    """`cache` placed on `mesh`: batch over "data", heads or channels over "model" (`cache_specs`)."""
    specs = cache_specs(cache, config, mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(cache)
    return jax.tree.unflatten(treedef, _placed(leaves, specs, mesh, "cache"))


def shard_batch(tokens, mesh: Mesh):
    """Token ids `[B, T]` (or any array with the batch first) split over the mesh's "data" axis."""
    axis, n = _mesh_size(mesh, "batch")
    if n > 1 and tokens.shape[0] % n:
        raise ValueError(f"batch {tokens.shape[0]} does not split over mesh axis {axis!r} of size {n}")
    return _global_array(tokens, NamedSharding(auto_mesh(mesh), PartitionSpec(axis)))
