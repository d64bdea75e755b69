"""Tokenizers for every checkpoint kind, as `transformers` tokenizers (and, for the command line, a lighter
`TextTokenizer` of a GGUF file).

Building a tokenizer from GGUF metadata takes seconds, so the result is saved once under the user
cache (`$SSM_LLM_CACHE`, default `~/.cache/ssm_llm`) and reloaded from there.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from converters.cache_dir import cache_root, source_digest
from converters.checkpoint import TOKENIZER_DIR, is_checkpoint
from converters.gguf_file import open_reader
from converters.text_tokenizer import TextTokenizer, TransformersText

# Files any transformers tokenizer is built from (fast, sentencepiece, BPE / WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# GGUF metadata transformers needs to build a tokenizer (the vocabulary and its kind).
GGUF_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")


def _gguf_cache_dir(path: Path) -> Path:
    """Where the tokenizer built from GGUF file `path` is kept: keyed by the file's content."""
    return cache_root() / "tokenizers" / f"{path.stem}-{source_digest(path)[:16]}"


def _gguf_tokenizer_dir(path: Path) -> Path:
    """The directory of the tokenizer built from GGUF file `path`, built and saved there on first use."""
    cached = _gguf_cache_dir(path)
    if cached.is_dir():
        return cached
    from transformers import AutoTokenizer

    _check_gguf_has_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


@contextlib.contextmanager
def tokenizer_built_aside(source):
    """Around other work (the model's conversion), build the tokenizer of GGUF file `source` in a child
    process when it is not cached yet: transformers' conversion from GGUF metadata is pure Python (11-12 s
    on the 2-core CPU) and in a thread it would contend for the GIL, while a process runs it on the other
    core. On leaving, waits for the child; a later `load_tokenizer` / `load_text_tokenizer` then reads the
    cached result (or, if the child failed, builds it again and reports the error). Does nothing for other
    sources or a cached tokenizer."""
    path = Path(source)
    if not (path.is_file() and path.suffix == ".gguf") or _gguf_cache_dir(path).is_dir():
        yield
        return
    child = subprocess.Popen(
        [sys.executable, "-m", "converters.tokenizer", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    except BaseException:
        child.kill()
        raise
    finally:
        child.wait()


def _from_gguf(path: Path):
    # Saved as a fast tokenizer: read with its class, not AutoTokenizer, whose import pulls in torch
    # (2.5 s against 0.9 s on the 2-core CPU, imports included).
    cached = _gguf_tokenizer_dir(path)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(cached, local_files_only=True)


def _check_gguf_has_tokenizer(path: Path) -> None:
    """Fail clearly when a GGUF file lacks the vocabulary transformers builds its tokenizer from (it would
    raise a bare KeyError)."""
    fields = open_reader(path).fields  # memory-mapped: reads the metadata, not the tensors
    missing = [key for key in GGUF_TOKENIZER_KEYS if key not in fields]
    if missing:
        raise ValueError(f"{path} holds no tokenizer: its metadata lacks {', '.join(missing)}")


def _check_has_tokenizer_files(directory: Path) -> None:
    """Fail clearly when `directory` has none of the files a tokenizer is built from: transformers would
    otherwise guess a tokenizer class from config.json and ask to install sentencepiece or tiktoken."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES) and not any(directory.glob("*.tiktoken")):
        raise FileNotFoundError(
            f"{directory} holds no tokenizer: found none of {', '.join(TOKENIZER_FILES)} or *.tiktoken"
        )


def load_text_tokenizer(source):
    """What the command line needs of a tokenizer (encode, decode, chat template, EOS id) at the least start-up
    cost: a GGUF file's cached tokenizer read by `TextTokenizer` without importing transformers (0.05 s
    against 0.8 s); any other source's transformers tokenizer behind the same methods."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return TextTokenizer.from_dir(_gguf_tokenizer_dir(path))
    return TransformersText(load_tokenizer(source))


def load_tokenizer(source):
    """The tokenizer of a GGUF file, a Hugging Face model directory or a directory written by `save`."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_dir():
        if is_checkpoint(path):
            if not (path / TOKENIZER_DIR).is_dir():
                raise ValueError(f"{path} holds no tokenizer; it was saved without one")
            path = path / TOKENIZER_DIR
        _check_has_tokenizer_files(path)
        from transformers import AutoTokenizer

        # Never trust_remote_code: a checkpoint directory is untrusted input (its auto_map is not run).
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    raise FileNotFoundError(f"no tokenizer source at {source}: expected a .gguf file or a model directory")


if __name__ == "__main__":  # the child process of `tokenizer_built_aside`
    _gguf_tokenizer_dir(Path(sys.argv[1]))
