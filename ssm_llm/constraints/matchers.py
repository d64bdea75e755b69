"""The host side of constrained decoding: one llguidance matcher per sequence, its next-token mask, and
which sequences the grammar has finished."""

from __future__ import annotations

import numpy as np

from ssm_llm.constraints.spec import Constraint


class Matchers:
    """Each row's position in the constraint's grammar.

    `masks(done)` gives the tokens each row may emit next ([B, vocab_size] bool): what the grammar allows,
    plus the `eos` ids once the text so far is complete (the tokenizer's own end token only if it is one of
    them). `advance(tokens)` moves every row past its new token (-1 or an EOS: nothing). A row whose grammar
    can take no more tokens is `finished` when there is no EOS id to end it with. `allows(row, token)` checks
    one token (rejection sampling's way). `evaluations` counts the tokens on which the constraint was
    evaluated: the tokenizer's whole vocabulary per mask, one per `allows`.
    """

    def __init__(self, constraint: Constraint, batch: int, vocab_size: int, eos: tuple[int, ...]):
        if constraint.tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"{constraint!r} was built for a tokenizer of {constraint.tokenizer.vocab_size} tokens, more than the "
                f"model's vocabulary of {vocab_size}: it belongs to another model"
            )
        self.rows = [constraint.matcher() for _ in range(batch)]
        self.constraint, self.vocab_size, self.eos = constraint, vocab_size, list(eos)
        self.known = constraint.tokenizer.vocab_size  # ids past the tokenizer's (padding): never allowed
        self.tokenizer_eos = [t for t in constraint.tokenizer.eos_tokens if t < self.known]
        self._next: list[np.ndarray | None] = [None] * batch  # each row's grammar tokens, until it advances
        self._forced: list[list[int] | None] = [None] * batch  # each row's forced tokens ([] if none), likewise
        self.evaluations = 0

    def masks(self, done: np.ndarray) -> np.ndarray:
        """[B, vocab_size] bool: the tokens each row may emit next (every token for rows already done)."""
        every = np.ones(self.vocab_size, bool)
        return np.stack([every if done[row] else self.row_mask(row) for row in range(len(done))])

    def row_mask(self, row: int, *, complete_ok: bool = False) -> np.ndarray:
        """[vocab_size] bool: the tokens `row` may emit next. None allowed: ValueError, unless `complete_ok` and
        the row's text is complete (a grammar that takes nothing more, without EOS ids: the mask is empty)."""
        out = np.zeros(self.vocab_size, bool)
        out[: self.known] = self._grammar_tokens(row)
        out[self.eos] = self.rows[row].is_accepting()
        if not out.any() and not (complete_ok and self.rows[row].is_accepting()):
            raise ValueError(
                f"{self.constraint!r} allows no next token for sequence {row} (the vocabulary cannot spell "
                "any continuation of its text so far)"
            )
        return out

    def allows(self, row: int, token: int) -> bool:
        """Whether `row` may emit `token` next, the constraint evaluated on this one token: `row_mask(row)[token]`
        without the mask. Where the grammar forces the next bytes, llguidance's masks allow only the first token
        of their canonical tokenization (a subset of the tokens that could spell them); so does this."""
        self.evaluations += 1
        if token in self.eos:
            return self.rows[row].is_accepting()
        if token >= self.known or token in self.tokenizer_eos:
            return False
        forced = self.forced(row)
        if forced:
            return token == forced[0]
        return self.rows[row].validate_tokens([token]) == 1

    def forced(self, row: int) -> list[int]:
        """The tokens `row`'s grammar forces next, in llguidance's canonical tokenization ([] if the next bytes
        are free): where the grammar forces bytes, the masks allow only the first of these tokens."""
        if self._forced[row] is None:
            self._forced[row] = list(self.rows[row].compute_ff_tokens())
            self._check(row, self.rows[row])
        return self._forced[row]

    def advance(self, tokens: np.ndarray) -> None:
        """Consume each row's new token (rows with -1 or an EOS id emit nothing to the grammar)."""
        for row, token in enumerate(np.asarray(tokens).tolist()):
            self.consume(row, token)

    def consume(self, row: int, token: int) -> None:
        """Move `row` past `token` (-1 or an EOS id: nothing)."""
        if token < 0 or token in self.eos:
            return
        self.rows[row].consume_token(token)
        self._check(row, self.rows[row])
        self._next[row] = self._forced[row] = None

    def tree_allows(self, row: int, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """[N] bool: the nodes of a draft tree (`tokens`, `parents` [N] in `speculative.tree`'s layout, node 0 the
        root, already emitted) whose path from the root the grammar accepts from `row`'s current state: each node
        checked once, on its own token, walking the tree depth-first (llguidance's rollback restores the state).
        An EOS id is accepted where the text is complete, and nothing after it; the row's state is unchanged."""
        children: list[list[int]] = [[] for _ in tokens]
        for node, parent in enumerate(parents.tolist()[1:], start=1):
            if parent >= 0:
                children[parent].append(node)
        keep = np.zeros(len(tokens), bool)
        keep[0] = True
        matcher = self.rows[row]
        stack = [(0, False)]  # (node, leaving): a node's children are visited between its two entries
        while stack:
            node, leaving = stack.pop()
            if leaving:
                if not matcher.rollback(1):
                    raise RuntimeError(f"{self.constraint!r}, sequence {row}: llguidance could not roll back a draft")
                continue
            if node:
                matcher.consume_token(int(tokens[node]))
                self._check(row, matcher)
            for child in reversed(children[node]):
                token = int(tokens[child])
                self.evaluations += 1
                if token in self.eos:
                    keep[child] = matcher.is_accepting()
                elif token < self.known and token not in self.tokenizer_eos and matcher.validate_tokens([token]) == 1:
                    keep[child] = True
                    stack += [(child, True), (child, False)]
        return keep

    def complete(self, among: np.ndarray | None = None) -> np.ndarray:
        """[B] bool: rows (of those `among` [B] bool, default all) whose text is complete and can take no more
        tokens (only an EOS id may follow)."""
        among = np.ones(len(self.rows), bool) if among is None else among
        return np.asarray(
            [
                bool(among[r]) and (m.is_stopped() or (m.is_accepting() and not self._grammar_tokens(r).any()))
                for r, m in enumerate(self.rows)
            ],
            bool,
        )

    def stopped(self) -> np.ndarray:
        """[B] bool: rows llguidance flags as unable to take more tokens, when there is no EOS id to end them
        with (cheap: no mask; `finished` also catches complete rows whose vocabulary has nothing left)."""
        if self.eos:
            return np.zeros(len(self.rows), bool)
        return np.asarray([m.is_stopped() for m in self.rows], bool)

    def finished(self) -> np.ndarray:
        """[B] bool: rows whose grammar takes no more tokens and that have no EOS id to end with."""
        if self.eos:
            return np.zeros(len(self.rows), bool)
        return self.complete()

    def _grammar_tokens(self, row: int) -> np.ndarray:
        """[tokenizer vocabulary] bool: the tokens the row's grammar allows next, its tokenizer's EOS left out."""
        if self._next[row] is None:
            matcher = self.rows[row]
            self.evaluations += self.known
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
            self._check(row, matcher)
            allowed = bits[: self.known].astype(bool)
            allowed[self.tokenizer_eos] = False
            self._next[row] = allowed
        return self._next[row]

    def _check(self, row: int, matcher) -> None:
        if matcher.is_error():
            raise RuntimeError(f"{self.constraint!r}, sequence {row}: {matcher.get_error()}")
