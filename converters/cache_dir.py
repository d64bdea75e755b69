"""The user cache directory of converted artefacts, and content digests of the sources they come from.

`cache_root()` is `$SSM_LLM_CACHE` (default `~/.cache/ssm_llm`). `source_digest(path)` identifies a GGUF
file or a model directory by its content: each file is read once and its sha256 is remembered in
`<root>/digests.json` under the file's resolved path with its size, mtime and inode (as git's index
does), so a file that changes in any of these is hashed again and an unchanged one costs a `stat`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

DIGESTS_FILE = "digests.json"
_CHUNK = 8 << 20


def cache_root() -> Path:
    """Where converted artefacts are cached: `$SSM_LLM_CACHE`, default `~/.cache/ssm_llm`."""
    return Path(os.environ.get("SSM_LLM_CACHE", Path.home() / ".cache" / "ssm_llm"))


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _read_memo(root: Path) -> dict:
    try:
        memo = json.loads((root / DIGESTS_FILE).read_text())
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(root: Path, memo: dict) -> None:
    """Best effort and atomic (a temporary file renamed over the old one): a cache that cannot be written
    only costs a re-hash next time."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{DIGESTS_FILE}.{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, root / DIGESTS_FILE)
    except OSError:
        pass


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(path: Path) -> list[Path]:
    """The files a source is read from: the file itself, or every non-hidden file under a directory."""
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def source_digest(path: str | Path) -> str:
    """sha256 over the names (relative to a directory) and content digests of `path`'s files."""
    path = Path(path)
    root = cache_root()
    memo = _read_memo(root)  # {resolved file path: [size, mtime_ns, inode, sha256]}
    changed = False
    total = hashlib.sha256()
    for file in source_files(path):
        key, stat = str(file.resolve()), _stat(file)
        known = memo.get(key)
        if not (isinstance(known, list) and known[:3] == stat):
            memo[key], changed = [*stat, _hash_file(file)], True
        total.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{memo[key][3]}\0".encode())
    if changed:
        _write_memo(root, {k: v for k, v in memo.items() if Path(k).exists()})  # forget deleted files
    return total.hexdigest()
