"""Hugging Face checkpoints as `(config dict, tensor mapping)`: a model directory, or objects in memory.

Directories are untrusted input: `.bin` files are read only with `torch.load(weights_only=True)`,
safetensors are preferred, and no code from the directory is ever executed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from converters.hf_fields import config_dict
from converters.safetensors_file import SafetensorsFile


class ShardedTensors(Mapping):
    """One mapping over several shard mappings; a name present in two shards is an error."""

    def __init__(self, shards: list[Mapping]):
        self._owner: dict[str, Mapping] = {}
        for shard in shards:
            for name in shard:
                if name in self._owner:
                    raise ValueError(f"tensor {name!r} appears in more than one checkpoint shard")
                self._owner[name] = shard

    def __getitem__(self, name: str) -> np.ndarray:
        return self._owner[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch checkpoint; reading it needs torch: pip install 'ssm_llm[torch]'"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ValueError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor")
    return {name: _torch_to_numpy(t) for name, t in state.items()}


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON in {what} ({e})") from None


def _shard_name(index_path: Path, name) -> str:
    """A shard file name from an index, which must stay inside the model directory.

    Checked lexically, without resolving symlinks: the Hugging Face hub cache stores every file as a
    symlink into ../../blobs, and that must keep working; what a shard *name* may not do is climb out.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index_path}: weight_map value {name!r} is not a shard file name")
    path = PurePosixPath(name.replace("\\", "/"))  # a backslash separates directories on Windows
    if "\0" in name or path.is_absolute() or PureWindowsPath(name).drive or ".." in path.parts:
        raise ValueError(
            f"{index_path}: shard {name!r} is outside the model directory; expected a file name "
            f"relative to {index_path.parent}"
        )
    return name


def _shard_files(directory: Path, single: str, index: str) -> list[Path] | None:
    if (directory / single).is_file():
        return [directory / single]
    index_path = directory / index
    if not index_path.is_file():
        return None
    content = _read_json(index_path, "the shard index")
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{index_path}: corrupt shard index; expected an object with a 'weight_map' object "
            f"mapping tensor names to shard files"
        )
    files = sorted({_shard_name(index_path, f) for f in weight_map.values()})
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise ValueError(f"{index_path} lists shard(s) not in the directory: {missing}")
    return [directory / f for f in files]


def read_hf_directory(directory: str | Path) -> tuple[dict[str, Any], Mapping]:
    """Read `config.json` and the weights (safetensors, else pytorch_model.bin) of a model directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    config = config_dict(_read_json(config_path, "the model config"), str(config_path))
    files = _shard_files(directory, "model.safetensors", "model.safetensors.index.json")
    if files is not None:
        return config, ShardedTensors([SafetensorsFile(f) for f in files])
    files = _shard_files(directory, "pytorch_model.bin", "pytorch_model.bin.index.json")
    if files is not None:
        return config, ShardedTensors([_read_torch_bin(f) for f in files])
    raise ValueError(f"{directory} has no model.safetensors or pytorch_model.bin weights")


def read_state_dict(state_dict: Mapping, config) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A `transformers` / PyTorch state dict (tensors or arrays) and its config (object or dict)."""
    if isinstance(config, Mapping):
        config = dict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    else:
        raise TypeError(f"config must be a transformers config or a dict, got {type(config).__name__}")
    tensors = {}
    for name, value in state_dict.items():
        if isinstance(value, np.ndarray):
            tensors[name] = value
        elif hasattr(value, "detach"):
            tensors[name] = _torch_to_numpy(value)
        else:
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, expected a tensor or array")
    return config, tensors


def read_transformers_model(model) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An in-memory `transformers` model (e.g. `LlamaForCausalLM`)."""
    return read_state_dict(model.state_dict(), model.config)
