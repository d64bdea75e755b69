"""Converted params saved with orbax beside a JSON config, so a second load needs no PyTorch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from ssm_llm.config import ModelConfig, config_from_dict

CONFIG_FILE = "ssm_llm_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


def is_checkpoint(directory: str | Path) -> bool:
    """True if `directory` was written by `save`."""
    return (Path(directory) / CONFIG_FILE).is_file()


def save(params: dict, config: ModelConfig, directory: str | Path, *, tokenizer=None,
         overwrite: bool = False) -> Path:
    """Write `params` (orbax), `config` (JSON) and optionally a `transformers` tokenizer to `directory`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params, quantized = _split_quantized(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict()}
    if quantized:
        meta["quantized_weights"] = quantized
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_checkpoint(directory: str | Path, dtype=None) -> tuple[ModelConfig, dict]:
    """Read a directory written by `save`; `dtype` (optional) casts floating params."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = config_from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_FILE}: corrupt ssm_llm config ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: unsupported checkpoint format {meta.get('format_version')!r}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(directory / PARAMS_DIR)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise ValueError(f"{directory}: cannot restore params ({type(e).__name__}: {e})") from None
    if dtype is not None:  # integer codes of quantized weights keep their dtype
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                        params)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return config, _join_quantized(params, meta.get("quantized_weights", {}), directory)


def _split_quantized(params: dict) -> tuple[dict, dict]:
    """Replace every `QuantizedWeight` by a plain {"values", "scales"} dict (orbax stores arrays only);
    returns the new tree and {"path/to/weight": {"bits", "group_size"}}."""
    from pallas_kernels.quantized_matmul import QuantizedWeight

    found = {}

    def walk(node, path):
        if isinstance(node, QuantizedWeight):
            found["/".join(path)] = {"bits": node.bits, "group_size": node.group_size}
            return {"values": node.values, "scales": node.scales}
        if isinstance(node, dict):
            return {k: walk(v, path + (str(k),)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, path + (str(i),)) for i, v in enumerate(node))
        return node

    return walk(params, ()), found


def _join_quantized(params: dict, quantized: dict, directory: Path) -> dict:
    """Invert `_split_quantized` with the layout recorded in the config file."""
    from pallas_kernels.quantized_matmul import QuantizedWeight

    for path, layout in quantized.items():
        *parents, leaf = path.split("/")
        node = params
        try:
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            stored = node[leaf]
            node[leaf] = QuantizedWeight(stored["values"], stored["scales"], int(layout["bits"]),
                                         int(layout["group_size"]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{directory}: quantized weight {path!r} is missing or malformed ({e})") from None
    return params
