"""What a constrained generation must follow, bound to the tokenizer whose tokens are masked.

The grammars are compiled by llguidance (a maintained grammar engine: regular expressions, JSON schemas,
Lark context-free grammars), never by hand here.
"""

from __future__ import annotations

import json

import llguidance


def tokenizer(source, eos_token_ids=None) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer (about 1 s for a 49k vocabulary): build it once and pass it to many
    constraints. `source`: a Hugging Face fast tokenizer (e.g. `converters.load_tokenizer(path)`), a
    `tokenizers.Tokenizer`, or an `LLTokenizer` (returned as is). `eos_token_ids`: the ids that end a sequence
    (default: the tokenizer's own)."""
    if isinstance(source, llguidance.LLTokenizer):
        return source
    eos = None if eos_token_ids is None else list(eos_token_ids)
    backend = getattr(source, "backend_tokenizer", source)
    if not hasattr(backend, "to_str"):
        raise TypeError(
            "a constraint needs a fast tokenizer: a transformers tokenizer backed by `tokenizers` (e.g. "
            f"converters.load_tokenizer(path)), a tokenizers.Tokenizer or an llguidance.LLTokenizer; got "
            f"{type(source).__name__}"
        )
    if eos is None:
        eos = getattr(source, "eos_token_id", None)
    return llguidance.LLTokenizer(backend.to_str(), eos_token=eos)


class Constraint:
    """A grammar in llguidance's format bound to a tokenizer. Use `Regex`, `JSONSchema` or `Grammar`."""

    def __init__(self, grammar: str, source, what: str):
        self.grammar, self.what = grammar, what
        self.tokenizer = tokenizer(source)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise ValueError(f"{what} is not a valid constraint: {messages[0].strip()}")

    def matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar (one per generated sequence)."""
        return llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.what})"


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class Regex(Constraint):
    """Generated text that matches the regular expression `pattern` in full (Rust `regex` syntax)."""

    def __init__(self, pattern: str, tokenizer):
        if not isinstance(pattern, str):
            raise TypeError(f"Regex pattern must be a str, got {type(pattern).__name__}")
        super().__init__(llguidance.LLMatcher.grammar_from_regex(pattern), tokenizer, f"regex {_preview(pattern)}")


class JSONSchema(Constraint):
    """Generated text that is one JSON value valid under `schema` (a dict or its JSON text). Compact by default
    (no whitespace between tokens, so a model cannot loop on spaces); `whitespace=True` allows JSON's
    whitespace."""

    def __init__(self, schema, tokenizer, *, whitespace: bool = False):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"JSONSchema: the schema text is not JSON: {err}") from None
        if not isinstance(schema, (dict, bool)):
            raise TypeError(f"JSONSchema needs a schema dict (or its JSON text), got {type(schema).__name__}")
        options = {"whitespace_flexible": bool(whitespace)}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        super().__init__(grammar, tokenizer, f"JSON schema {_preview(json.dumps(schema))}")


class Grammar(Constraint):
    """Generated text in the language of a context-free grammar in Lark syntax (rule `start`), e.g.
    `'start: expr\\nexpr: NUMBER | "(" expr "+" expr ")"\\n%import common.NUMBER'`."""

    def __init__(self, lark: str, tokenizer):
        if not isinstance(lark, str):
            raise TypeError(f"Grammar needs Lark text, got {type(lark).__name__}")
        super().__init__(llguidance.LLMatcher.grammar_from_lark(lark), tokenizer, f"grammar {_preview(lark)}")
