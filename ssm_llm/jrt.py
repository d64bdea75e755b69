"""Just read twice (Arora et al., 2024, "Just read twice: closing the recall gap for recurrent language models"):
a recurrent model reading a context once must decide what to keep before it knows the question; written twice,
with the question first, the second reading knows what to keep. A pure prompt transform, in the layout of the
authors' evaluation tasks (HazyResearch/prefix-linear-attention, e.g. SQuAD "twice": `question + " " + context +
"\\n" + original prompt`, the original prompt being the context followed by the question).
"""

from __future__ import annotations

from collections.abc import Sequence


def read_twice(context: str, question: str, *, lead: str | None = None, separator: str = "\n") -> str:
    """`f"{lead} {context}{separator}{context} {question}"`: the context twice, led by `lead` (default: the
    question itself) and followed by the question, e.g. read_twice("Ann lives in Oslo.", "Where does Ann live?")
    == "Where does Ann live? Ann lives in Oslo.\\nAnn lives in Oslo. Where does Ann live?"."""
    for name, value in (("context", context), ("question", question), ("separator", separator)):
        if not isinstance(value, str):
            raise TypeError(f"read_twice: {name} must be a str, got {type(value).__name__}")
    if lead is not None and not isinstance(lead, str):
        raise TypeError(f"read_twice: lead must be a str or None, got {type(lead).__name__}")
    if not context.strip():
        raise ValueError("read_twice: the context is empty; there is nothing to read twice")
    lead = question if lead is None else lead
    return f"{lead} {context}{separator}{context} {question}"


def read_twice_ids(
    context: Sequence[int], question: Sequence[int], *, separator: Sequence[int] = (), lead: Sequence[int] | None = None
) -> list[int]:
    """The same layout on token ids, for prompts already tokenized: `lead + context + separator + context +
    question` (`lead` default: the question). Joining the pieces' ids is not tokenizing the joined text (BPE
    may merge across a boundary); the text form is what the authors evaluated."""
    pieces = {"context": context, "question": question, "separator": separator}
    if lead is not None:
        pieces["lead"] = lead
    out = {}
    for name, ids in pieces.items():
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"read_twice_ids: {name} must be a list of token ids, got {type(ids).__name__}")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"read_twice_ids: {name} must hold non-negative int token ids")
        out[name] = list(ids)
    if not out["context"]:
        raise ValueError("read_twice_ids: the context is empty; there is nothing to read twice")
    return out.get("lead", out["question"]) + out["context"] + out["separator"] + out["context"] + out["question"]
