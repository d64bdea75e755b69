"""A cache of converted models: `converters.load(path, cache=True)` converts a GGUF file or a Hugging Face
directory once, stores the result under `<cache root>/models/`, and later loads with the same options read
it back instead (no dequantizing or re-laying out, no torch).

An entry is keyed by the source's content (`cache_dir.source_digest`), the load options (dtype, quantize,
group_size) and `ENTRY_VERSION`. A source that changes gets a new key, and the entry of its old content
is removed. An entry is a directory holding `manifest.json` (the config, the tree of params, each leaf's
dtype, shape, offset and CRC-32) and `params.bin` (the leaves' bytes, 64-byte aligned), written in a
temporary directory and renamed into place. Reading maps the file and checks every leaf's CRC-32 as it
copies it out (SmolLM2-135M, 538 MB: 0.5 s, against 1.8 s for the same params as an orbax checkpoint;
CRC-32 catches accidental damage, which is what a user's own cache meets, and costs 0.15 s against
0.37 s for sha256), then the params against the config. A damaged or unreadable entry is deleted and
converted again, never used. Writing is best effort: a cache that cannot be written costs the
conversion, not the load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters.cache_dir import cache_root, source_digest
from converters.checkpoint import join_quantized, split_quantized
from ssm_llm.config_io import config_from_dict
from ssm_llm.param_check import check_params

# Bump when the converted layout or this format changes, so older entries are no longer read.
ENTRY_VERSION = 1
MODELS_DIR = "models"
MANIFEST = "manifest.json"
DATA = "params.bin"
ALIGN = 64


def models_dir() -> Path:
    """Where converted models are cached."""
    return cache_root() / MODELS_DIR


def entry_path(source: Path, options: dict) -> Path:
    """The cache entry of `source` loaded with `options` (a JSON-able dict)."""
    key = json.dumps({"source": source_digest(source), "options": options, "version": ENTRY_VERSION}, sort_keys=True)
    return models_dir() / f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _warn(message: str) -> None:
    print(f"ssm_llm cache: {message}", file=sys.stderr)


def load_cached(source: Path, options: dict, convert: Callable[[], tuple], background: bool = False) -> tuple:
    """`(config, params)` of `source` from its cache entry, or from `convert()` (then stored as the entry).

    background: store a new entry in a (non-daemon) thread and return at once; the process waits for the
    thread before it exits. For command-line runs, which tokenize and compile meanwhile (the write took
    1-4 s for SmolLM2's 538 MB on the 2-core machine)."""
    entry = entry_path(source, options)
    if entry.exists():
        try:
            return read_entry(entry)
        except (ValueError, OSError) as err:  # damaged, truncated, edited or half-deleted
            _warn(f"entry {entry.name} is damaged ({err}); converting again")
            remove_entry(entry)
    config, params = convert()
    meta = {"source": str(source.resolve()), "options": options, "created": time.time()}
    if background:
        threading.Thread(target=_store, args=(params, config, entry, meta), name="ssm_llm cache write").start()
    else:
        _store(params, config, entry, meta)
    return config, params


def _store(params, config, entry: Path, meta: dict) -> None:
    """Write the entry, then remove the entries of the source's older content (same path and options)."""
    try:
        write_entry(params, config, entry, meta)
    except OSError as err:
        _warn(f"could not write {entry} ({err}); the next load converts again")
        return
    for other in entries():
        if other["path"] != entry and other.get("source") == meta["source"] and other.get("options") == meta["options"]:
            remove_entry(other["path"])


def _skeleton(node, leaves: list):
    """The JSON shape of a params tree (dicts, lists, arrays, None), its arrays appended to `leaves`."""
    if isinstance(node, dict):
        return {"dict": {str(k): _skeleton(v, leaves) for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        return {"list": [_skeleton(v, leaves) for v in node]}
    if node is None:
        return None
    leaves.append(np.ascontiguousarray(np.asarray(node)))
    return {"leaf": len(leaves) - 1}


def _fill(skeleton, arrays: list):
    """Invert `_skeleton`."""
    if skeleton is None:
        return None
    if "dict" in skeleton:
        return {k: _fill(v, arrays) for k, v in skeleton["dict"].items()}
    if "list" in skeleton:
        return [_fill(v, arrays) for v in skeleton["list"]]
    return arrays[skeleton["leaf"]]


def write_entry(params: dict, config, entry: Path, meta: dict) -> None:
    """Store `params` and `config` as the entry `entry` (atomically: a temporary directory renamed into place)."""
    tree, quantized = split_quantized(params)
    leaves: list[np.ndarray] = []
    skeleton = _skeleton(tree, leaves)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{entry.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        records, offset = [], 0
        with open(staging / DATA, "wb") as f:
            for array in leaves:
                data = array.reshape(-1).view(np.uint8)
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(data.data)
                records.append(
                    {"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset, "crc32": zlib.crc32(data)}
                )
                offset += data.nbytes
        manifest = {
            "version": ENTRY_VERSION,
            "config": config.to_dict(),
            "quantized_weights": quantized,
            "tree": skeleton,
            "leaves": records,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest))
        os.replace(staging, entry)  # fails if another process put the entry in place first: keep theirs
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not entry.is_dir():
            raise
        return
    entry.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def read_entry(entry: Path) -> tuple:
    """`(config, params)` of an entry; ValueError or OSError if it is damaged in any way."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest["version"] != ENTRY_VERSION:
            raise ValueError(f"version {manifest['version']!r}")
        config = config_from_dict(manifest["config"])
        records = manifest["leaves"]
        data = np.memmap(entry / DATA, np.uint8, "r") if records else np.zeros(0, np.uint8)
        arrays = []
        for i, record in enumerate(records):
            dtype = jnp.dtype(record["dtype"])
            size = math.prod(record["shape"]) * dtype.itemsize
            raw = data[record["offset"] : record["offset"] + size]
            if raw.size != size or zlib.crc32(raw) != record["crc32"]:
                raise ValueError(f"leaf {i} of {DATA} is truncated or its bytes changed (CRC-32 mismatch)")
            arrays.append(jnp.array(raw.view(dtype).reshape(record["shape"])))  # a copy: the file may go
        params = join_quantized(_fill(manifest["tree"], arrays), manifest["quantized_weights"], entry)
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"malformed {MANIFEST} ({type(err).__name__}: {err})") from None
    check_params(params, config)
    return config, params


def entries() -> list[dict]:
    """Every cache entry: {"path", "bytes", "source", "options", "created"} (the last three None when its
    description is missing)."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            meta = {}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append({"path": path, "bytes": size, **{k: meta.get(k) for k in ("source", "options", "created")}})
    return found


def remove_entry(path: Path) -> None:
    """Delete one entry and its description."""
    shutil.rmtree(path, ignore_errors=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def clear() -> tuple[int, int]:
    """Delete every cached model -> (entries removed, bytes freed)."""
    found = entries()
    for entry in found:
        remove_entry(entry["path"])
    return len(found), sum(e["bytes"] for e in found)
