"""Converted params saved with orbax beside a JSON config, so a second load needs no PyTorch."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ssm_llm.config import ModelConfig
from ssm_llm.config_io import config_from_dict
from ssm_llm.param_check import check_params

CONFIG_FILE = "ssm_llm_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


def is_checkpoint(directory: str | Path) -> bool:
    """True if `directory` was written by `save`."""
    return (Path(directory) / CONFIG_FILE).is_file()


def _unexpected_entries(directory: Path) -> list[str]:
    """Names in `directory` that `save` does not write (all of them if it is not a checkpoint)."""
    names = sorted(p.name for p in directory.iterdir())
    if not is_checkpoint(directory):
        return names
    return [n for n in names if n not in (CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR)]


def check_destination(
    directory: str | Path, *, overwrite: bool = False, source: str | Path | None = None, flag: str = "overwrite=True"
) -> Path:
    """Where `save` may write, as an absolute path; cheap, so callers run it before a slow load.

    A new or empty directory is fine; an existing one is replaced only with `overwrite`, and only if it
    holds an ssm_llm checkpoint and nothing else, so a mistyped path cannot delete unrelated files.
    `source` (the checkpoint being converted) may not be the destination, inside it, or contain it.
    `flag` names the overwrite option in the error (the CLI's is --overwrite).
    """
    directory = Path(directory).resolve()
    if source is not None:
        src = Path(source).resolve()
        if src == directory or directory in src.parents or src in directory.parents:
            raise ValueError(f"destination {directory} overlaps the source {src}; choose a directory outside it")
    if not directory.exists():
        return directory
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; give a directory path for the checkpoint")
    if not any(directory.iterdir()):
        return directory
    unexpected = _unexpected_entries(directory)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise FileExistsError(
            f"{directory} holds {shown}, not (only) an ssm_llm checkpoint; refusing to "
            f"replace it: choose a new or empty directory"
        )
    if not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint; pass {flag} to replace it")
    return directory


def save(params: dict, config: ModelConfig, directory: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `params` (orbax), `config` (JSON) and optionally a `transformers` tokenizer to `directory`.

    `overwrite` replaces an existing ssm_llm checkpoint (never any other non-empty directory; see
    `check_destination`). The checkpoint is written to a temporary sibling first and swapped in at the
    end, so an error or interrupt midway leaves the old checkpoint as it was and no temporary files.
    """
    directory = check_destination(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final renames stay on one file system and are atomic; mkdir (not mkdtemp) so
    # the checkpoint gets the usual permissions rather than mkdtemp's 0700.
    token = secrets.token_hex(4)
    staging = directory.parent / f".{directory.name}.tmp-{token}"
    staging.mkdir()
    try:
        _write(params, config, staging, tokenizer)
        _swap_in(staging, directory, directory.parent / f".{directory.name}.old-{token}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _write(params: dict, config: ModelConfig, directory: Path, tokenizer) -> None:
    import orbax.checkpoint as ocp

    params, quantized = split_quantized(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "sha256": _digests(params)}
    if quantized:
        meta["quantized_weights"] = quantized
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def _host_value(leaf) -> np.ndarray:
    """The whole value of `leaf` in this process's memory: an array sharded over several processes' devices
    is gathered (every process gets it)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _digests(tree) -> dict[str, str]:
    """{leaf path: sha256 of its dtype, shape and bytes}: orbax stores no checksum of its own, so a flipped
    byte in params/ would otherwise load as a silently different weight (about 0.3 s per 500 MB). Sharded
    leaves are gathered to the host one at a time."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.ascontiguousarray(_host_value(leaf))
        digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.view(np.uint8).reshape(-1).data)
        out[jax.tree_util.keystr(path)] = digest.hexdigest()
    return out


def _check_digests(params, saved, directory: Path) -> None:
    """Compare restored params with the digests `save` recorded (checkpoints written before digests
    existed have none and load unverified)."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"{directory / CONFIG_FILE}: corrupt ssm_llm config ('sha256' must map leaves to digests)")
    found = _digests(params)
    if set(found) != set(saved):
        changed = sorted(set(found) ^ set(saved))
        raise ValueError(
            f"{directory}: the params hold other leaves than were saved ({', '.join(changed[:3])}); "
            f"the checkpoint is damaged"
        )
    damaged = [k for k in found if found[k] != saved[k]]
    if damaged:
        raise ValueError(
            f"{directory}: {len(damaged)} param(s) differ from what was saved (checksum mismatch in "
            f"{', '.join(damaged[:3])}); the checkpoint is damaged: convert it again"
        )


def _swap_in(staging: Path, directory: Path, backup: Path) -> None:
    """Move `staging` to `directory`; an existing `directory` goes to a backup that is deleted only once
    the new one is in place (and is moved back if that fails)."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    os.replace(directory, backup)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(backup, directory)
        raise
    shutil.rmtree(backup, ignore_errors=True)  # the new checkpoint is in place: a leftover is no failure


def load_checkpoint(directory: str | Path, dtype=None, mesh=None) -> tuple[ModelConfig, dict]:
    """Read a directory written by `save`; `dtype` (optional) casts floating params. With `mesh` (a
    `jax.sharding.Mesh`), each leaf is restored straight into the shards `ssm_llm.sharding`'s rules give it:
    no device reads the whole model."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:  # ValueError includes json.JSONDecodeError
        raise ValueError(f"{directory / CONFIG_FILE}: corrupt ssm_llm config ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: unsupported checkpoint format {meta.get('format_version')!r}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            target = None
            if mesh is not None:
                stored = checkpointer.metadata(directory / PARAMS_DIR).item_metadata
                target = _sharded_target(getattr(stored, "tree", stored), meta, config, mesh, directory)
            params = checkpointer.restore(directory / PARAMS_DIR, target)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise ValueError(f"{directory}: cannot restore params ({type(e).__name__}: {e})") from None
    _check_digests(params, meta.get("sha256"), directory)
    params = join_quantized(jax.tree_util.tree_map(jnp.asarray, params), meta.get("quantized_weights", {}), directory)
    if dtype is not None:  # plain float leaves only: quantized and compressed weights keep their stored arrays
        params = jax.tree_util.tree_map(
            lambda x: x if _compressed(x) or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype),
            params,
            is_leaf=_compressed,
        )
    try:  # an edited or mismatched config file would otherwise run to garbage
        check_params(params, config)
    except ValueError as e:
        raise ValueError(f"{directory}: the params do not match {CONFIG_FILE}: {e}") from None
    return config, params


def _sharded_target(stored, meta: dict, config, mesh, directory: Path):
    """The abstract tree orbax restores into: each stored leaf's shape and dtype with the `NamedSharding`
    the rules give it (quantized weights take their float weight's layout, as `shard_params` does)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from ssm_llm.sharding import auto_mesh, param_specs

    def abstract():
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)

    joined = join_quantized(abstract(), meta.get("quantized_weights", {}), directory)
    try:
        specs, _ = split_quantized(param_specs(joined, config, mesh))
    except ValueError as e:
        raise ValueError(f"{directory}: the params do not match {CONFIG_FILE}: {e}") from None
    mesh = auto_mesh(mesh)
    return jax.tree.map(
        lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec)),
        abstract(),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _compressed(x) -> bool:
    """A quantized or compressed weight (kept whole by casts)."""
    from pallas_kernels.cpu_int8_dot import BlockedInt8Weight
    from pallas_kernels.dfloat11 import DFloat11Weight
    from pallas_kernels.quantized_matmul import QuantizedWeight
    from ssm_llm.bitstack_weight import BitStackWeight

    return isinstance(x, (QuantizedWeight, BlockedInt8Weight, DFloat11Weight, BitStackWeight))


def split_quantized(params: dict) -> tuple[dict, dict]:
    """Replace every `QuantizedWeight` by a plain {"values", "scales"(, "offsets")} dict and every DFloat11 or
    BitStack weight by its arrays (orbax stores arrays only); returns the new tree and {"path/to/weight": layout},
    the layout {"bits", "group_size"}, {"format": "dfloat11", "block", "code_bits"} or {"format": "bitstack",
    "shape"}."""
    from pallas_kernels.cpu_int8_dot import BlockedInt8Weight, to_plain
    from pallas_kernels.dfloat11 import DFloat11Weight
    from pallas_kernels.quantized_matmul import QuantizedWeight
    from ssm_llm.bitstack_weight import BitStackWeight

    found = {}

    def walk(node, path):
        if isinstance(node, BlockedInt8Weight):  # stored in the plain layout (`ssm_llm.int8_blocks`)
            node = to_plain(node)
        if isinstance(node, QuantizedWeight):
            found["/".join(path)] = {"bits": node.bits, "group_size": node.group_size}
            arrays = {"values": node.values, "scales": node.scales}
            return arrays if node.offsets is None else {**arrays, "offsets": node.offsets}
        if isinstance(node, DFloat11Weight):
            found["/".join(path)] = {"format": "dfloat11", "block": node.block, "code_bits": node.code_bits}
            return {name: getattr(node, name) for name in DFLOAT11_ARRAYS}
        if isinstance(node, BitStackWeight):
            found["/".join(path)] = {"format": "bitstack", "shape": list(node.shape)}
            return {name: getattr(node, name) for name in BITSTACK_ARRAYS}
        if isinstance(node, dict):
            return {k: walk(v, path + (str(k),)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, path + (str(i),)) for i, v in enumerate(node))
        return node

    return walk(params, ()), found


DFLOAT11_ARRAYS = ("sign_mantissa", "stream", "block_starts", "table")
BITSTACK_ARRAYS = ("signs", "u", "v", "scale")


def join_quantized(params: dict, quantized: dict, directory: Path) -> dict:
    """Invert `split_quantized` with the layout recorded in the config file."""
    from pallas_kernels.dfloat11 import DFloat11Weight, check_weight
    from pallas_kernels.quantized_matmul import QuantizedWeight
    from ssm_llm.bitstack_weight import BitStackWeight, check_bitstack

    for path, layout in quantized.items():
        *parents, leaf = path.split("/")
        node = params
        try:
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            stored = node[leaf]
            if layout.get("format") == "dfloat11":
                arrays = [stored[name] for name in DFLOAT11_ARRAYS]
                node[leaf] = DFloat11Weight(*arrays, int(layout["block"]), int(layout["code_bits"]))
                check_weight(node[leaf], path)
                continue
            if layout.get("format") == "bitstack":
                rows, cols = (int(n) for n in layout["shape"])
                node[leaf] = BitStackWeight(*(stored[name] for name in BITSTACK_ARRAYS), (rows, cols))
                check_bitstack(node[leaf])
                continue
            node[leaf] = QuantizedWeight(
                stored["values"],
                stored["scales"],
                int(layout["bits"]),
                int(layout["group_size"]),
                stored.get("offsets"),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{directory}: quantized weight {path!r} is missing or malformed ({e})") from None
    return params
