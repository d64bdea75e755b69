"""Real English text for training and evaluating small models, present on every machine (no download).

Sources, in this order: Python's language reference (`pydoc_data.topics.topics`, every topic, sorted
by name, ~465 KB) and Vim's manuals (`/usr/share/vim/vim90/doc/*.txt`, sorted, ~9.8 MB).

Documents and the split: each source text (a topic or a manual file) is cut at blank lines into
documents of at least `DOC_CHARS` characters (a shorter text is one document). Whole manuals are too
uneven in size (a few hold most of the text) for a per-file split to hold out a stable share, so the
unit is this run of paragraphs. Every `HELD_OUT_EVERY`-th document (global index 0, 10, 20, ...) is
held out ("eval"), the rest is "train": the split is by document, deterministic, and the two never
share text. Held-out indices do not depend on later sources or on `max_chars`, so a small corpus
(tests) holds the same first documents, split the same way, as the full one.

Token streams: a split's documents are tokenized (the SmolLM2 tokenizer by default) and concatenated;
a separator token (`<|endoftext|>`, else the tokenizer's EOS) follows a document wherever the text
breaks: at the end of its source, or where the next document of the source went to the other split.
Token ids are cached as .npy files under `$SSM_LLM_CACHE/corpus/`, keyed by a hash of the text and
the tokenizer's vocabulary, since tokenizing ~10 MB takes a while.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

VIM_DOC_DIR = Path("/usr/share/vim/vim90/doc")
SOURCES = ("pydoc", "vim")
DOC_CHARS = 8192
HELD_OUT_EVERY = 10
SPLITS = ("train", "eval", "all")
SEPARATOR_TOKEN = "<|endoftext|>"
_FORMAT = 1  # bump when the cached arrays' meaning changes


@dataclasses.dataclass(frozen=True)
class Document:
    """A run of paragraphs: `source` names its text ("pydoc:assert", "vim:options.txt"), `part` is its
    position within that text (0, 1, ...)."""

    source: str
    part: int
    text: str


def source_texts(sources: Sequence[str] = SOURCES, vim_dir: str | Path = VIM_DOC_DIR) -> list[tuple[str, str]]:
    """`(name, text)` of every source text, in corpus order. FileNotFoundError if "vim" is asked for
    and `vim_dir` holds no .txt manuals."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {tuple(sources)!r}")
    texts = []
    if "pydoc" in sources:
        from pydoc_data.topics import topics

        texts += [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]
    if "vim" in sources:
        files = sorted(Path(vim_dir).glob("*.txt"))
        if not files:
            raise FileNotFoundError(
                f"no Vim manuals (*.txt) in {vim_dir}; install vim's runtime files, or use only the "
                f"Python reference (sources=('pydoc',), --corpus pydoc)"
            )
        # A few manuals hold non-UTF-8 bytes; replacing them keeps the text (and its hash) deterministic.
        texts += [(f"vim:{f.name}", f.read_bytes().decode("utf-8", errors="replace")) for f in files]
    return texts


def cut_documents(name: str, text: str, doc_chars: int = DOC_CHARS) -> list[Document]:
    """Cut `text` after blank lines into documents of at least `doc_chars` characters (the last one
    may be shorter). Joining their texts gives `text` back."""
    paragraphs = re.split(r"(?<=\n\n)(?=[^\n])", text)
    docs, current = [], ""
    for paragraph in paragraphs:
        current += paragraph
        if len(current) >= doc_chars:
            docs.append(Document(name, len(docs), current))
            current = ""
    if current.strip() or not docs:
        docs.append(Document(name, len(docs), current))
    elif current:  # trailing blank lines belong to the last document
        docs[-1] = dataclasses.replace(docs[-1], text=docs[-1].text + current)
    return docs


def corpus_documents(
    sources: Sequence[str] = SOURCES,
    *,
    vim_dir: str | Path = VIM_DOC_DIR,
    max_chars: int | None = None,
    doc_chars: int = DOC_CHARS,
) -> list[Document]:
    """Every document of `sources`, in corpus order; with `max_chars`, only the first documents,
    up to the one that reaches `max_chars` characters in all (a small corpus for tests)."""
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be None or > 0, got {max_chars}")
    docs, total = [], 0
    for name, text in source_texts(sources, vim_dir):
        for doc in cut_documents(name, text, doc_chars):
            if max_chars is not None and total >= max_chars:
                return docs
            docs.append(doc)
            total += len(doc.text)
    return docs


def is_held_out(index: int) -> bool:
    """Whether the document at corpus position `index` belongs to the held-out ("eval") split."""
    return index % HELD_OUT_EVERY == 0


def separator_id(tokenizer) -> int:
    """The token that marks a break in the text: `<|endoftext|>` if the vocabulary has it, else EOS."""
    token = tokenizer.convert_tokens_to_ids(SEPARATOR_TOKEN)
    if token is not None and token != tokenizer.unk_token_id:
        return token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither {SEPARATOR_TOKEN!r} nor an EOS token")
    return tokenizer.eos_token_id


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents and their tokens. tokens: [N] int32, all documents back to back (no separators);
    offsets: [D + 1], document i is tokens[offsets[i]:offsets[i + 1]]."""

    documents: list[Document]
    tokens: np.ndarray
    offsets: np.ndarray
    separator: int

    @property
    def held_out(self) -> np.ndarray:
        """[D] bool: which documents are held out."""
        return np.array([is_held_out(i) for i in range(len(self.documents))], bool)

    def split_indices(self, split: str) -> np.ndarray:
        """Corpus positions of the documents in `split` ("train", "eval" or "all")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        held = self.held_out
        keep = np.ones_like(held) if split == "all" else held if split == "eval" else ~held
        return np.flatnonzero(keep)

    def split_tokens(self, split: str) -> np.ndarray:
        """[N_split] int32: the documents of `split` in corpus order, a separator wherever the text breaks."""
        indices = self.split_indices(split)
        pieces = []
        for k, i in enumerate(indices):
            pieces.append(self.tokens[self.offsets[i] : self.offsets[i + 1]])
            doc = self.documents[i]
            following = self.documents[indices[k + 1]] if k + 1 < len(indices) else None
            if following is None or following.source != doc.source or following.part != doc.part + 1:
                pieces.append(np.array([self.separator], np.int32))
        return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def _default_tokenizer():
    from converters.tokenizer import load_tokenizer
    from ssm_llm.default_model import default_model_path

    return load_tokenizer(default_model_path())


def _cache_key(documents: list[Document], tokenizer) -> str:
    digest = hashlib.sha256(f"format {_FORMAT}\n".encode())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([type(tokenizer).__name__, vocab]).encode())
    for doc in documents:
        digest.update(f"\0{doc.source}\0{doc.part}\0{len(doc.text)}\0".encode())
        digest.update(doc.text.encode())
    return digest.hexdigest()[:20]


def _tokenize(documents: list[Document], tokenizer, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every document (no special tokens), with progress per source text."""
    by_source: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        by_source.setdefault(doc.source, []).append(i)
    ids: list[list[int]] = [[] for _ in documents]
    for indices in tqdm(by_source.values(), desc="tokenizing", unit="text", disable=not progress):
        encoded = tokenizer([documents[i].text for i in indices], add_special_tokens=False)["input_ids"]
        for i, tokens in zip(indices, encoded, strict=True):
            ids[i] = tokens
    offsets = np.cumsum([0] + [len(t) for t in ids]).astype(np.int64)
    tokens = np.fromiter((t for doc in ids for t in doc), np.int32, count=int(offsets[-1]))
    return tokens, offsets


def load_corpus(
    sources: Sequence[str] = SOURCES,
    *,
    max_chars: int | None = None,
    tokenizer=None,
    vim_dir: str | Path = VIM_DOC_DIR,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TokenizedCorpus:
    """The tokenized corpus (see the module docstring), from the cache when this text was seen before.

    tokenizer: a `transformers` tokenizer (default: SmolLM2's, from `ssm_llm.default_model_path()`);
    cache_dir: default `$SSM_LLM_CACHE/corpus`.
    """
    from converters.cache_dir import cache_root

    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
    documents = corpus_documents(sources, vim_dir=vim_dir, max_chars=max_chars)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "corpus"
    key = _cache_key(documents, tokenizer)
    tokens_file, offsets_file = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.offsets.npy"
    if tokens_file.is_file() and offsets_file.is_file():
        tokens, offsets = np.load(tokens_file), np.load(offsets_file)
    else:
        tokens, offsets = _tokenize(documents, tokenizer, progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir))
        np.save(tmp / tokens_file.name, tokens)
        np.save(tmp / offsets_file.name, offsets)
        # Offsets land last: a reader that finds both files finds complete ones.
        (tmp / tokens_file.name).replace(tokens_file)
        (tmp / offsets_file.name).replace(offsets_file)
        shutil.rmtree(tmp, ignore_errors=True)
    if len(offsets) != len(documents) + 1:
        raise ValueError(f"corpus cache {offsets_file} holds {len(offsets) - 1} documents, expected {len(documents)}")
    return TokenizedCorpus(documents, tokens, offsets, separator_id(tokenizer))


def corpus_tokens(split: str, sources: Sequence[str] = SOURCES, **kwargs) -> np.ndarray:
    """[N] int32: the token stream of `split` ("train", "eval" or "all"); kwargs go to `load_corpus`."""
    return load_corpus(sources, **kwargs).split_tokens(split)


def _check_window(tokens: np.ndarray, seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"a window needs seq_len + 1 = {seq_len + 1} tokens, but the stream has {len(tokens)}")


def batches(tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless training batches: windows `[batch, seq_len + 1]` (inputs and the next-token targets)
    starting at uniform random positions of `tokens: [N]`. Each batch draws from `rng` only when it is
    requested, so saving `rng.bit_generator.state` after k batches lets a run resume at batch k + 1."""
    _check_window(tokens, seq_len)
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    offsets = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len, size=batch)
        yield tokens[starts[:, None] + offsets].astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """[n, seq_len + 1] int32 evaluation windows of `tokens: [N]`: consecutive windows that overlap by
    one token (so each token is a target exactly once), or `max_windows` of them evenly spaced over
    the stream. Deterministic."""
    _check_window(tokens, seq_len)
    count = (len(tokens) - 1) // seq_len
    chosen = np.arange(count)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be None or >= 1, got {max_windows}")
        if count > max_windows:
            chosen = np.unique(np.linspace(0, count - 1, max_windows).round().astype(np.int64))
    return tokens[chosen[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)
