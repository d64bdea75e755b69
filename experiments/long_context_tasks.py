"""RULER-style long-context tasks built locally from real text (Hsieh et al., 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?"): exactly `length` tokens each, the haystack being Python's
language reference (`kv_compression_eval.reference_text`).

- multi-key needle ("multikey"): `needles` sentences "One of the special magic numbers for {word} is: {n}." at
  evenly spread depths, each for another word; the question asks for one word's number (the others are
  distractors). Correct if the answer's first number is that word's.
- variable tracking ("variables"): a chain "VAR A = n." then "VAR B = VAR A." ... over `hops` hops spread
  through the haystack, plus an unrelated chain of the same shape with another value; the question asks which
  variables hold n. Scored as the fraction of the chain's names in the answer, 0 if a distractor's name is in it.
"""

from __future__ import annotations

import re

import numpy as np

WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
    "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "thistle", "umber", "violet",
)  # fmt: skip
MULTIKEY_NEEDLE = "\nOne of the special magic numbers for {word} is: {number}.\n"
MULTIKEY_QUESTION = (
    "\n\nWhat is the special magic number for {word} mentioned in the provided text? "
    "The special magic number for {word} mentioned in the provided text is"
)
VARIABLE_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VARIABLE_QUESTION = (
    "\n\nQuestion: Find all variables that are assigned the value {number} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {hops} variables are assigned "
    "the value {number}, they are:"
)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _insert(tokenizer, hay: list[int], pieces: list[str], length: int, head: str, tail: str) -> list[int]:
    """`head` + haystack with `pieces` at evenly spread depths + `tail`, exactly `length` tokens."""
    head_ids, tail_ids = _encode(tokenizer, head), _encode(tokenizer, tail)
    piece_ids = [_encode(tokenizer, p) for p in pieces]
    fill = length - len(head_ids) - len(tail_ids) - sum(map(len, piece_ids))
    if fill < len(pieces) + 1:
        raise ValueError(f"a {length}-token prompt leaves no room for the haystack around {len(pieces)} pieces")
    cuts = [round(fill * (i + 1) / (len(pieces) + 1)) for i in range(len(pieces))]
    out, previous = list(head_ids), 0
    for cut, ids in zip(cuts, piece_ids, strict=True):
        out += hay[previous:cut] + ids
        previous = cut
    return out + hay[previous:fill] + tail_ids


def multikey_prompt(tokenizer, hay: list[int], length: int, rng: np.random.Generator, needles: int = 4):
    """(prompt ids, expected number): `needles` word -> number needles, the question about one of them."""
    words = rng.choice(WORDS, needles, replace=False).tolist()
    numbers = [int(n) for n in rng.integers(1_000_000, 10_000_000, needles)]
    asked = int(rng.integers(needles))
    pieces = [MULTIKEY_NEEDLE.format(word=w, number=n) for w, n in zip(words, numbers, strict=True)]
    prompt = _insert(tokenizer, hay, pieces, length, "", MULTIKEY_QUESTION.format(word=words[asked]))
    return prompt, numbers[asked]


def multikey_score(answer: str, expected: int) -> float:
    found = re.search(r"\d+", answer)
    return float(found is not None and found.group() == str(expected))


def _names(rng, count: int) -> list[str]:
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names = set()
    while len(names) < count:
        names.add("".join(rng.choice(letters, 3)))
    return sorted(names, key=lambda _: rng.random())


def variables_prompt(tokenizer, hay: list[int], length: int, rng: np.random.Generator, hops: int = 4):
    """(prompt ids, (chain names, distractor names)): a `hops`-hop assignment chain of one value and a
    distractor chain of another, interleaved through the haystack."""
    names = _names(rng, 2 * (hops + 1))
    chain, other = names[: hops + 1], names[hops + 1 :]
    number, decoy = (int(n) for n in rng.integers(10_000, 100_000, 2))

    def statements(vars_, value):
        return [f"\nVAR {vars_[0]} = {value}.\n"] + [
            f"\nVAR {b} = VAR {a}.\n" for a, b in zip(vars_[:-1], vars_[1:], strict=True)
        ]

    pieces = [p for pair in zip(statements(chain, number), statements(other, decoy), strict=True) for p in pair]
    prompt = _insert(
        tokenizer, hay, pieces, length, VARIABLE_INTRO, VARIABLE_QUESTION.format(number=number, hops=hops + 1)
    )
    return prompt, (chain, other)


def variables_score(answer: str, names: tuple[list[str], list[str]]) -> float:
    chain, other = names
    said = set(re.findall(r"\b[A-Z]{3}\b", answer))
    if said & set(other):
        return 0.0
    return len(said & set(chain)) / len(chain)


# task -> (prompt builder, scorer, greedy answer tokens)
TASKS = {
    "multikey": (multikey_prompt, multikey_score, 12),
    "variables": (variables_prompt, variables_score, 24),
}
