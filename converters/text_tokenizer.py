"""A tokenizer read straight from `tokenizer.json` with the `tokenizers` library (the Rust core that
transformers' fast tokenizers wrap), its chat template rendered with jinja2 the way transformers renders it.

It exists for start-up time: on the 2-core CPU it loads in 0.05 s where transformers'
`PreTrainedTokenizerFast` takes 0.8 s, mostly transformers' own import. The ids, the decoded text and the
rendered chat are those of the transformers tokenizer saved in the same directory
(tests/test_text_tokenizer.py compares them).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"  # transformers >= 4.50 saves the template beside the config
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with its "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (for WordPiece vocabularies that set clean_up_tokenization_spaces)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for suffix in ("'m", "'s", "'ve", "'re"):
        text = text.replace(" " + suffix, suffix)
    return text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each of the 256 bytes in its vocabulary
    (printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(extra)}


_BYTE_LEVEL = _byte_level_alphabet()


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for: through GPT-2's alphabet for byte-level BPE, else a
    SentencePiece byte-fallback piece "<0xAB>" is that byte and "\u2581" a space."""
    if byte_level and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode()


def _compile_chat_template(source: str):
    """The template compiled in the sandboxed environment transformers uses (trim_blocks, lstrip_blocks, loop
    controls, a `tojson` that keeps non-ASCII text, `raise_exception` and `strftime_now`). Chat templates
    are untrusted input: the immutable sandbox keeps them from touching Python internals."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class TextTokenizer:
    """Encode, decode and chat-template text with a `tokenizers.Tokenizer` and its tokenizer_config.json."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None):
        self._tokenizer = tokenizer
        self._special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS if config.get(name)}
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self._chat_source = chat_template
        self._chat = None  # compiled on first use

    @classmethod
    def from_dir(cls, directory) -> TextTokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json` and the chat template (`chat_template.jinja`, or the
        config's "chat_template" string) from `directory`."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not (directory / TOKENIZER_JSON).is_file():
            raise FileNotFoundError(f"{directory} holds no {TOKENIZER_JSON}")
        config_file = directory / TOKENIZER_CONFIG
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        template_file = directory / CHAT_TEMPLATE
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if not isinstance(template, str | None):  # a list of named templates: not supported here
            raise ValueError(f"{config_file}: chat_template is not a single template")
        return cls(Tokenizer.from_file(str(directory / TOKENIZER_JSON)), config, template)

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (transformers' name for it), e.g. for `ssm_llm.constraints`."""
        return self._tokenizer

    @property
    def eos_token_id(self) -> int | None:
        eos = self._special.get("eos_token")
        return None if eos is None else self._tokenizer.token_to_id(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's BOS / EOS when `add_special_tokens`)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of token ids `ids`."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (part of a UTF-8 character for some tokens)."""
        byte_level = type(self._tokenizer.decoder).__name__ == "ByteLevel"
        return piece_bytes(self._tokenizer.id_to_token(int(token_id)) or "", byte_level)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat `messages` ([{"role", "content"}, ...]) rendered by the tokenizer's chat template."""
        if self._chat_source is None:
            raise ValueError("this tokenizer has no chat template")
        if self._chat is None:
            self._chat = _compile_chat_template(self._chat_source)
        return self._chat.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._special)


class TransformersText:
    """A transformers tokenizer behind `TextTokenizer`'s methods (for checkpoints without a tokenizer.json)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def backend_tokenizer(self):
        """The wrapped tokenizer's `tokenizers.Tokenizer` (None for a slow tokenizer)."""
        return getattr(self.tokenizer, "backend_tokenizer", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of token ids `ids`."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        byte_level = hasattr(self.tokenizer, "byte_decoder") or (
            backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        )
        return piece_bytes(self.tokenizer.convert_ids_to_tokens(int(token_id)) or "", byte_level)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat rendered by the tokenizer's chat template."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
