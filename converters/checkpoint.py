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
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict()}
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
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return config, jax.tree_util.tree_map(jnp.asarray, params)
