"""The serving engine: requests come and go between steps; each step runs one compiled function over every
slot (continuous batching), mixing decode tokens of running requests with prefill chunks of new ones.

Attention models keep K/V in a pool of pages with a block table per request and share the pages of common
prompt prefixes (`PageTable`); when pages run out the youngest request is preempted (its pages freed, its
tokens recomputed later). Mamba models keep one state per slot, and snapshots of it where a prompt chunk ends
on a page boundary (every such chunk, and the prompt's last boundary; `SnapshotTable`) serve later prompts
with the same prefix. Each request's tokens are what `generate` gives for that request alone (greedy), and a
sampled request draws its i-th token with `fold_in(key(seed), i)`, whatever else runs.

engine = Engine(params, config, max_slots=8)
rid = engine.submit(prompt_ids, ssm_llm.GenerationConfig(max_new_tokens=32))
for event in engine.step(): ...          # (rid, new_token_ids, finished, finish_reason)
outputs = engine.run()                   # steps until idle: {rid: tokens}
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections import deque
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import StreamingMask
from ssm_llm.config import ModelConfig
from ssm_llm.constraints import Matchers, awrs
from ssm_llm.generation import GenerationConfig, check_options, check_prompts
from ssm_llm.kv import StreamingLLM
from ssm_llm.model import init_cache
from ssm_llm.models import family_module
from ssm_llm.models.lm_head import activation_dtype
from ssm_llm.param_check import check_params
from ssm_llm.sampling import Sampling, greedy_tokens
from ssm_llm.serving import state_snapshots
from ssm_llm.serving.model_step import Rows, init_pages, reset_slots, step
from ssm_llm.serving.page_table import PageTable
from ssm_llm.serving.state_snapshots import SnapshotTable
from ssm_llm.speculative import PromptLookup
from ssm_llm.validation import as_int, as_token_ids


class _EventFields(NamedTuple):
    rid: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class Event(_EventFields):
    """What one request emitted in a step: (rid, new_token_ids, finished, finish_reason), which unpacks as
    those four; finish_reason is None while running, else "eos", "length" (max_new_tokens), "cancelled" or
    "error". Attributes besides: `error` (why a request failed) and `logprobs` (a `TokenLogprobs` per new
    token, for a request that asked for them), both None otherwise, and `emitted_at` (`time.perf_counter()`
    when the engine made it: inter-token latencies measured from it do not include the reader's delays)."""

    def __new__(cls, rid, new_token_ids, finished, finish_reason, error=None, logprobs=None):
        event = super().__new__(cls, rid, new_token_ids, finished, finish_reason)
        event.error, event.logprobs, event.emitted_at = error, logprobs, time.perf_counter()
        return event


class TokenLogprobs(NamedTuple):
    """A generated token's log-probability under the model (the raw softmax of its logits, before
    temperature or top-k/p) and the `top` most likely tokens as ((token id, log-probability), ...)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass
class _Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    eos: frozenset
    sampling: Sampling | None  # None: greedy
    seed: int
    arrival: int
    out: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    computed: int = 0  # tokens of prompt + out held in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    prefix_key: tuple | None = None  # the key of the last registered full page
    registered: int = 0  # full pages registered in the prefix cache
    failures: int = 0  # failed steps this request was part of
    logprobs: int | None = None  # alternatives to report with each token (None: no log-probabilities)
    drafter: PromptLookup | None = None  # speculative decoding (greedy, attention models)
    streaming: StreamingLLM | None = None  # sinks + recent window once the prompt is in; pages between them freed
    matchers: Matchers | None = None  # a constraint's grammar state (structured output)
    rejection: bool = False  # the constraint applied by rejection (AWRS) rather than masks

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


COMPILATIONS = {"step": 0}  # traces of the engine step (each new shape or config compiles once)


# The most alternatives a request may ask for with each token (OpenAI's limit for completions).
MAX_TOP_LOGPROBS = 5


@functools.partial(jax.jit, static_argnames=("config", "num_slots", "impl", "logprobs"), donate_argnames=("state",))
def _step(params, config, state, decode, prefill, num_slots, impl, logprobs=False, verify=None):
    """(logits, greedy tokens, log-probability tables or None, verify rows' greedy tokens or None, state).
    With `logprobs`: (logsumexp [S], the top `MAX_TOP_LOGPROBS` log-probabilities [S, K] and their ids),
    only in steps that need them."""
    COMPILATIONS["step"] += 1
    logits, checked, state = step(params, config, state, decode, prefill, num_slots, impl, verify)
    greedy = greedy_tokens(logits)
    tables = None
    if logprobs:
        lse = jax.nn.logsumexp(logits, axis=-1)
        top, ids = jax.lax.top_k(logits, MAX_TOP_LOGPROBS)
        tables = (lse, top - lse[:, None], ids)
    return logits, greedy, tables, checked, state


_reset = jax.jit(reset_slots, donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("sampling_static",))
def _draw(logits, temperature, top_p, min_p, key, sampling_static):
    greedy, top_k, use_top_p, use_min_p = sampling_static
    rule = Sampling(temperature, top_p, min_p, greedy, top_k, use_top_p, use_min_p)
    return rule.draw(logits[None], key)[0]


# The decode pass computes a power-of-two number of rows, at least this many: fewer buckets mean fewer compiled
# programs, and small row counts cost alike on CPU (SmolLM2's 210 float32 products, issue 20: 35 ms for 1 row,
# 63 for 4, 75 for 8, 85 for 16), while 32 rows for one request halve its speed (bench_server, one client of a
# 32-slot engine: 10 tok/s with 32 decode rows, 21 with 8).
_DECODE_ROWS_MIN = 8

# Draft tokens ride along only while the decoding requests feed at most this many tokens in all (each its
# token plus its drafts; each request's drafts are cut to its equal share: 7 for one, 3 each for two, none
# from eight on): bench_engine_speculative (SmolLM2, 2-core AMD EPYC, quoting prompts) gained 1.15x /
# 1.34x with 3 / 7 drafts at one request (4 / 8 tokens) and 1.20x with 3 at two (8), but lost at 16 tokens
# (0.89x: two requests x 7 drafts; 0.94x: four x 3) and more (0.70-0.78x at eight requests).
_SPECULATION_TOKENS = 8

# A request in this many failed steps in a row fails, even if it never failed alone (a failure only under
# load); a step it runs in without failing resets its count.
_MAX_FAILURES = 3


_awrs_propose = jax.jit(awrs.propose)  # a constrained request's perturbed logits [1, V] and best candidates [1, K]


def _bucket(n: int, cap: int) -> int:
    """`n` rounded up to a power of two, at most `cap` (compiled shapes come in few sizes)."""
    return min(1 << (n - 1).bit_length(), cap)


class Engine:
    """A continuous-batching engine over `params` / `config` (attention or Mamba families).

    max_slots: requests running at once. page_size / num_pages: the K/V pool of attention models (default:
    room for every slot at `max_len`). max_len: the longest prompt + output a request may ask for (default:
    the model's context, else 2048). chunk / prefill_rows: a step feeds one token to every decoding request
    and a chunk of `chunk` prompt tokens to each of the `prefill_rows` oldest prefilling ones, as two passes
    of one compiled program ([max_slots, 1] and [1, 2, ... prefill_rows, chunk]); attention attends over the
    pages the longest row needs, rounded up to a power of two (`programs()` bounds the compiled variants;
    none is new in steady state). prefix_caching: share full pages of common prompt prefixes.
    """

    def __init__(
        self,
        params: dict,
        config,
        *,
        max_slots: int = 8,
        page_size: int = 16,
        num_pages: int | None = None,
        max_len: int | None = None,
        chunk: int = 64,
        prefill_rows: int = 2,
        prefix_caching: bool = True,
        num_snapshots: int | None = None,
        page_dtype=None,
        impl: str = "auto",
    ):
        family_module(config)
        check_params(params, config)
        self.params, self.config, self.impl = params, config, impl
        self.max_slots = as_int("max_slots", max_slots, 1)
        self.chunk = as_int("chunk", chunk, 1)
        self.prefill_rows = min(as_int("prefill_rows", prefill_rows, 1), self.max_slots)
        context = getattr(config, "max_position_embeddings", None)
        self.max_len = as_int("max_len", max_len if max_len is not None else (context or 2048), 2)
        if context is not None and self.max_len > context:
            raise ValueError(f"max_len {self.max_len} exceeds the model's context of {context} positions")
        self.paged = isinstance(config, ModelConfig)
        self.page_dtype = activation_dtype(params) if page_dtype is None else jnp.dtype(page_dtype)
        if page_dtype is not None and not self.paged:
            raise ValueError("page_dtype is for attention models' pages; Mamba models keep float states")
        if not (jnp.issubdtype(self.page_dtype, jnp.floating) or self.page_dtype == jnp.int8):
            raise ValueError(f"page_dtype must be a float dtype or int8, got {self.page_dtype}")
        self.page_size = as_int("page_size", page_size, 1)
        self.prefix_caching = prefix_caching
        snapshots = 2 * self.max_slots if num_snapshots is None else num_snapshots
        self.num_snapshots = as_int("num_snapshots", snapshots, 0) if prefix_caching else 0
        if self.paged:
            self.pages_per_slot = math.ceil(self.max_len / self.page_size)
            pages = self.max_slots * self.pages_per_slot if num_pages is None else num_pages
            self.num_pages = as_int("num_pages", pages, 1)
            self.block_tables = np.zeros((self.max_slots, self.pages_per_slot), np.int32)
            self.min_pages = max(1, self.pages_per_slot // 8)  # the smallest attended page bucket
        else:
            self.block_tables = np.zeros((self.max_slots, 1), np.int32)
        self._new_state()
        self.slots: list[_Request | None] = [None] * self.max_slots
        self.waiting: deque[_Request] = deque()
        self.requests: dict[int, _Request] = {}
        self._cancelled: list[Event] = []
        self._final: dict[int, list[int]] = {}  # the whole output of each request finished in the last step
        self._next_rid = self._arrivals = 0
        self._generated = 0
        self._busy_seconds = 0.0
        self.preemptions = 0
        self.failed_steps = 0
        self.prefix_hits = 0  # prompt tokens served from cached pages or snapshots (kept when the cache is rebuilt)
        self.drafted = self.accepted = 0  # speculative draft tokens proposed / accepted
        self._drafts: dict[int, list[int]] = {}  # slot -> this step's draft tokens
        self.errors: dict[int, str] = {}  # why each request that failed in `run` / `run_batch` failed
        self._suspects: set[int] = set()  # requests of a failed step, each to be run alone once

    def _new_state(self) -> None:
        """An empty page pool and page table (attention), or zero states for every slot (Mamba)."""
        if self.paged:
            self.table = PageTable(self.num_pages, self.page_size, self.prefix_caching)
            self.state = init_pages(self.config, self.num_pages, self.page_size, self.page_dtype)
        else:
            self.state = init_cache(self.config, self.max_slots, self.max_len, activation_dtype(self.params))
            self.table = SnapshotTable(self.num_snapshots, self.page_size)
            self.store = state_snapshots.init_store(self.state, self.num_snapshots)
        self._restores: list[tuple[int, int]] = []  # (slot, store entry) of requests starting from a snapshot

    # -- requests ---------------------------------------------------------------------------------------

    def submit(self, prompt_ids, gen_config: GenerationConfig | None = None, *, logprobs: int | None = None) -> int:
        """Queue a request (`gen_config`: its options, default `GenerationConfig()`); returns its id. With
        `logprobs` (0..MAX_TOP_LOGPROBS) its events carry each token's log-probability and that many
        alternatives. A bad request raises ValueError here, naming the problem, and nothing else is affected."""
        gen_config = GenerationConfig() if gen_config is None else gen_config
        if logprobs is not None:
            logprobs = as_int("logprobs", logprobs, 0)
            if logprobs > MAX_TOP_LOGPROBS:
                raise ValueError(f"logprobs is {logprobs}; at most {MAX_TOP_LOGPROBS} alternatives are reported")
        prompt, eos, sampling = self._checked(prompt_ids, gen_config)
        rid = self._next_rid
        self._next_rid += 1
        if logprobs is not None and gen_config.speculative is not None:
            raise ValueError("logprobs are not reported for speculative requests; ask for one or the other")
        request = _Request(rid, prompt, gen_config.max_new_tokens, eos, sampling, gen_config.seed, self._arrivals)
        request.logprobs, request.drafter = logprobs, gen_config.speculative
        request.streaming = gen_config.kv_compression
        if gen_config.constraint is not None:
            request.matchers = Matchers(gen_config.constraint, 1, self.config.vocab_size, tuple(sorted(eos)))
            request.rejection = gen_config.constrained_sampling == "awrs"
        self._arrivals += 1
        self.requests[rid] = request
        self.waiting.append(request)
        return rid

    def _checked(self, prompt_ids, gen_config: GenerationConfig):
        """(prompt ids, EOS ids, Sampling or None for greedy) of a request, or ValueError / TypeError."""
        if not isinstance(gen_config, GenerationConfig):
            raise TypeError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
        self._check_kv_policy(gen_config.kv_compression)
        if gen_config.sparse_prefill is not None:
            raise ValueError(
                "the engine prefills in chunks over pages; sparse_prefill (MInference) needs the whole prompt at once: "
                "use ssm_llm.generate for it"
            )
        if gen_config.num_beams > 1:
            raise ValueError("the engine does not run num_beams > 1 requests yet: use ssm_llm.generate for them")
        spec = gen_config.speculative
        if spec is not None and gen_config.constraint is not None:
            raise ValueError(
                "the engine does not check drafts against a constraint yet: use ssm_llm.generate for constrained "
                "speculative decoding, or submit the request without speculative="
            )
        if spec is not None and not (isinstance(spec, PromptLookup) and self.paged and gen_config.temperature == 0):
            raise ValueError(
                f"the engine speculates only with PromptLookup, for greedy requests of attention models; got "
                f"{type(spec).__name__} at temperature {gen_config.temperature} for {type(self.config).__name__}"
            )
        (prompt,) = check_prompts([prompt_ids], self.config.vocab_size)
        check_options(self.config, gen_config, len(prompt), None)
        needed = len(prompt) + gen_config.max_new_tokens
        if needed > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({gen_config.max_new_tokens}) = {needed} exceeds "
                f"the engine's max_len of {self.max_len}"
            )
        if gen_config.kv_compression is not None:
            gen_config.kv_compression.check(self.config, np.array([len(prompt)]))
        pages = self._pages_needed(len(prompt), needed, gen_config.kv_compression)
        if self.paged and pages > self.num_pages:
            ring = " at the peak of its StreamingLLM ring" if gen_config.kv_compression is not None else ""
            raise ValueError(
                f"prompt + max_new_tokens = {needed} tokens need {pages} pages{ring}; the pool holds {self.num_pages}"
            )
        eos = gen_config.eos_token_ids if gen_config.eos_token_ids is not None else self.config.eos_token_ids
        eos = frozenset(as_token_ids("eos_token_ids", eos, self.config.vocab_size))
        sampling = None
        if gen_config.temperature > 0:
            sampling = Sampling.create(
                vocab_size=self.config.vocab_size,
                temperature=gen_config.temperature,
                top_k=gen_config.top_k,
                top_p=gen_config.top_p,
                min_p=gen_config.min_p,
            )
        return prompt, eos, sampling

    def _check_kv_policy(self, policy) -> None:
        """Refuse a KV policy the paged layout cannot run (only StreamingLLM at the tokens' own positions)."""
        if policy is None:
            return
        if not self.paged:
            raise ValueError(f"kv_compression is for attention models; {type(self.config).__name__} keeps a state")
        if not isinstance(policy, StreamingLLM):
            raise ValueError(
                f"the engine runs one KV policy, StreamingLLM(positions='original') (sinks and a recent window of "
                f"pages); got {type(policy).__name__} (int8 pages: Engine(page_dtype='int8'))"
            )
        if policy.positions != "original" or policy.distance_ceiling is not None:
            raise ValueError(
                "the engine's pages hold keys rotated at their positions in the text: StreamingLLM needs "
                f"positions='original' and no distance_ceiling there, got positions={policy.positions!r}, "
                f"distance_ceiling={policy.distance_ceiling}"
            )

    def _pages_needed(self, prompt_len: int, needed: int, policy: StreamingLLM | None) -> int:
        """The most pages a request holds at once: all its tokens' pages, or with StreamingLLM the prompt's,
        then its sinks' and those of the window before a chunk (`_chunk`) and the chunk's."""
        whole = math.ceil(needed / self.page_size)
        if policy is None:
            return whole
        span = policy.window - 1 + min(self.chunk, policy.window)
        ring = math.ceil(policy.sinks / self.page_size) + math.ceil(span / self.page_size) + 1
        return min(whole, max(math.ceil(prompt_len / self.page_size), ring))

    def _chunk(self, request: _Request, computed: int | None = None) -> int:
        """The tokens `request` may feed next from `computed` (default: what it has computed): up to `chunk`; a
        StreamingLLM request's chunks (recomputed after preemption) stop at its prompt's end and past it span
        at most its window, so its pages stay bounded."""
        computed = request.computed if computed is None else computed
        n = min(len(request.tokens) - computed, self.chunk)
        policy = request.streaming
        if policy is None:
            return n
        if computed < len(request.prompt):
            return min(n, len(request.prompt) - computed)
        return min(n, policy.window)

    def cancel(self, rid: int) -> bool:
        """Stop request `rid` and free what it holds; False if it is unknown or already finished."""
        request = self.requests.get(rid)
        if request is None:
            return False
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request)
        self._cancelled.append(Event(rid, [], True, "cancelled"))
        return True

    def _finish(self, request: _Request) -> None:
        self._release(request)
        self._suspects.discard(request.rid)
        del self.requests[request.rid]
        self._final[request.rid] = list(request.out)

    def _release(self, request: _Request) -> None:
        if request.slot is not None:
            self.slots[request.slot] = None
            request.slot = None
        if self.paged and request.pages:
            self.table.release([page for page in request.pages if page >= 0])
        request.pages, request.computed, request.prefix_key, request.registered = [], 0, None, 0

    # -- scheduling -------------------------------------------------------------------------------------

    def _admit(self) -> list[int]:
        """Move waiting requests into free slots (oldest first) while their first chunk fits the pool."""
        fresh = []
        while self.waiting and None in self.slots:
            request = self.waiting[0]
            if self.paged:
                tokens = request.tokens
                # The last token is always computed; a streaming request's generated tokens were computed with
                # its mask, so no other request's full-attention pages may stand in for them.
                limit = len(tokens) - 1 if request.streaming is None else min(len(tokens) - 1, len(request.prompt))
                pages, key = self.table.match(tokens, limit)
                start = len(pages) * self.page_size
                need = math.ceil((start + self._chunk(request, start)) / self.page_size)
                if need - len(pages) > self.table.available:
                    self.table.release(pages)
                    break
                request.pages, request.prefix_key, request.registered = pages, key, len(pages)
                request.computed = len(pages) * self.page_size
                self.prefix_hits += request.computed
            self.waiting.popleft()
            slot = self.slots.index(None)
            self.slots[slot], request.slot = request, slot
            fresh.append(slot)
            if not self.paged:
                tokens = request.tokens
                end, key, entry = self.table.match(tokens, min(len(request.prompt), len(tokens) - 1))
                if entry is not None:
                    self._restores.append((slot, entry))
                    request.computed, request.prefix_key, request.registered = end, key, end // self.page_size
                    self.prefix_hits += end
        return fresh

    def _preempt_youngest(self, keep: _Request) -> bool:
        """Free the youngest running request other than `keep` (it goes back to the front of the queue, to
        be recomputed); False if there is none."""
        running = [r for r in self.slots if r is not None and r is not keep]
        if not running:
            return False
        victim = max(running, key=lambda r: r.arrival)
        self._release(victim)
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return True

    def _reserve(self, request: _Request, end: int) -> bool:
        """Pages for positions < `end`, preempting younger requests if the pool is short; False if even that
        does not make room (then `request` itself is preempted)."""
        while len(request.pages) * self.page_size < end:
            page = self.table.allocate()
            if page is None:
                if request.arrival == max(r.arrival for r in self.slots if r is not None) or not (
                    self._preempt_youngest(request)
                ):
                    self._release(request)
                    self.waiting.appendleft(request)
                    self.preemptions += 1
                    return False
                continue
            request.pages.append(page)
        return True

    def _plan(self) -> dict[int, int]:
        """{slot: tokens to feed this step} for every running request that gets pages for them: one token
        for each decoding request, a chunk for each of the `prefill_rows` oldest prefilling ones."""
        feed, prefilling, self._drafts = {}, 0, {}
        running = sorted(enumerate(self.slots), key=lambda s: s[1].arrival if s[1] else -1)
        decoding = [r for _, r in running if r is not None and r.computed == len(r.tokens) - 1]
        share = _SPECULATION_TOKENS // max(len(decoding), 1) - 1  # drafts each decoding request may feed
        suspects = [(slot, r) for slot, r in running if r is not None and r.rid in self._suspects]
        for slot, request in suspects[:1] or running:  # after a failed step: one of its requests alone
            if request is None or request.slot is None:
                continue
            n = self._chunk(request)
            decoding_now = request.computed == len(request.tokens) - 1  # not a 1-token prompt chunk (chunk=1)
            drafts = self._propose(request, share) if share > 0 and decoding_now and request.drafter else []
            if not self.paged and self.num_snapshots:  # end a prompt chunk on a boundary (a snapshot there)
                boundary = min(request.computed + n, len(request.prompt) - 1) // self.page_size * self.page_size
                if boundary > request.computed:
                    n = boundary - request.computed
            if n > 1:
                if prefilling == self.prefill_rows:
                    continue  # waits for a later step
                prefilling += 1
            if self.paged and not self._reserve(request, request.computed + n + len(drafts)):
                continue
            feed[slot] = n
            if drafts:
                self._drafts[slot] = drafts
        feed = {slot: n for slot, n in feed.items() if self.slots[slot] is not None}  # less the preempted
        self._drafts = {slot: d for slot, d in self._drafts.items() if slot in feed}
        return feed

    def _propose(self, request: _Request, share: int) -> list[int]:
        """Prompt lookup's draft for a decoding request: the tokens that followed the latest earlier occurrence
        of its longest repeated suffix (n-grams from max_ngram down to min_ngram), at most num_tokens and
        `share`, and no more than its remaining tokens and `max_len` allow."""
        drafter, tokens = request.drafter, request.tokens
        room = min(drafter.num_tokens, share, request.max_new_tokens - len(request.out) - 1, self.max_len - len(tokens))
        if room <= 0:
            return []
        size = len(tokens)
        for n in range(min(drafter.max_ngram, size - 1), drafter.min_ngram - 1, -1):
            suffix = tokens[size - n :]
            for end in range(size - 2, n - 2, -1):  # the match ends at `end`, before the suffix's last token
                if tokens[end - n + 1 : end + 1] == suffix:
                    return tokens[end + 1 : end + 1 + room]
        return []

    # -- one step ---------------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit what fits, run one compiled step over all slots, sample, and report what each request
        emitted (finished ones included)."""
        events, self._cancelled = self._cancelled, []
        self._final = {}  # `_collect` reads it for requests finishing in this step only
        fresh = self._admit()
        if not self.paged and fresh:
            mask = np.zeros(self.max_slots, bool)
            mask[fresh] = True
            self.state = _reset(self.state, jnp.asarray(mask))
            for slot, entry in self._restores:
                self.state = state_snapshots.load(self.state, self.store, slot, entry)
        self._restores = []
        feed = self._plan()
        if not feed:
            return events
        verify = {slot: 1 + len(d) for slot, d in self._drafts.items()}
        decode = {slot: n for slot, n in feed.items() if n == 1 and slot not in verify}
        prefill = {slot: n for slot, n in feed.items() if n > 1}
        pages = self._page_bucket({**feed, **verify})
        start = time.perf_counter()
        wants = any(self.slots[slot].logprobs is not None for slot in feed)
        try:
            logits, greedy, tables, checked, state = _step(
                self.params,
                self.config,
                self.state,
                self._rows(decode, self._decode_rows(len(decode)), 1, pages) if decode else None,
                self._rows(prefill, _bucket(len(prefill), self.prefill_rows), self.chunk, pages) if prefill else None,
                self.max_slots,
                self.impl,
                wants,
                self._rows(verify, _bucket(len(verify), self.max_slots), _bucket(max(verify.values()), 1 << 10), pages)
                if verify
                else None,
            )
            greedy = np.asarray(greedy)  # the logits stay on the device unless a sampled request needs them
            checked = None if checked is None else np.asarray(checked)
            tables = None if tables is None else [np.asarray(t) for t in tables]
            self.state = state  # only once the step ran: a failure surfacing at the sync leaves the old state
        except Exception as err:  # noqa: BLE001 - any failure of the step is isolated, then reported per request
            return events + self._failed([self.slots[slot] for slot in feed], err)
        self._busy_seconds += time.perf_counter() - start
        for row, slot in enumerate(sorted(verify)):
            events.append(self._accept(self.slots[slot], checked[row]))
        for slot, n in feed.items():
            if slot in verify:
                continue
            request = self.slots[slot]
            self._suspects.discard(request.rid)  # it ran (alone, if it was a suspect) without failing
            request.failures = 0
            request.computed += n
            if self.paged:
                self._register_full_pages(request)
                self._free_passed_pages(request)
            elif self.num_snapshots:
                self._snapshot(request)
            if request.computed < len(request.tokens):
                continue  # a prefill chunk: no token yet
            if request.matchers is not None and request.matchers.finished()[0]:  # a grammar of "" alone
                self._finish(request)
                events.append(Event(request.rid, [], True, "constraint"))
                continue
            try:
                if request.matchers is not None:
                    token = self._constrained(request, logits[slot])
                else:
                    token = int(greedy[slot]) if request.sampling is None else self._sample(request, logits[slot])
            except Exception as err:  # noqa: BLE001 - this request's own failure
                self._finish(request)
                events.append(Event(request.rid, [], True, "error", f"{type(err).__name__}: {err}"))
                continue
            self._generated += 1
            if token in request.eos:
                self._finish(request)
                events.append(Event(request.rid, [], True, "eos"))
                continue
            request.out.append(token)
            reason = self._end(request, token)
            if reason is not None:
                self._finish(request)
            scored = None if request.logprobs is None else [self._logprobs(request, slot, token, logits, tables)]
            events.append(Event(request.rid, [token], reason is not None, reason, logprobs=scored))
        return events

    def _accept(self, request: _Request, greedy) -> Event:
        """A verify row's outcome: the drafts that equal the model's greedy tokens, then its own next token
        (what plain greedy decoding gives, one token at a time), cut at EOS or max_new_tokens."""
        self._suspects.discard(request.rid)
        request.failures = 0
        drafts = self._drafts[request.slot]
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == int(greedy[accepted]):
            accepted += 1
        self.drafted += len(drafts)
        self.accepted += accepted
        request.computed += 1 + accepted  # the fed token and the accepted drafts; the rest is overwritten later
        self._register_full_pages(request)
        self._free_passed_pages(request)
        emitted = []
        for token in (int(t) for t in greedy[: accepted + 1]):
            self._generated += 1
            if token in request.eos:
                self._finish(request)
                return Event(request.rid, emitted, True, "eos")
            emitted.append(token)
            request.out.append(token)
            if len(request.out) >= request.max_new_tokens:
                self._finish(request)
                return Event(request.rid, emitted, True, "length")
        return Event(request.rid, emitted, False, None)

    @staticmethod
    def _logprobs(request: _Request, slot: int, token: int, logits, tables) -> TokenLogprobs:
        lse, top, ids = (t[slot] for t in tables)
        k = request.logprobs
        chosen = float(top[0]) if token == int(ids[0]) else float(logits[slot, token]) - float(lse)
        return TokenLogprobs(chosen, tuple((int(i), float(v)) for i, v in zip(ids[:k], top[:k], strict=True)))

    def _failed(self, involved: list[_Request], err: Exception) -> list[Event]:
        """After a step over `involved` raised `err`: a request that failed alone (or in `_MAX_FAILURES`
        steps) fails with "error"; the others become suspects, each run alone in a later step, so a request
        that breaks the step fails by itself and the rest carry on. If the step consumed the cache (donated
        buffers), every running request goes back to the queue and is recomputed, as after preemption."""
        self.failed_steps += 1
        message = f"{type(err).__name__}: {err}"
        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.state)):
            running = sorted((r for r in self.slots if r is not None), key=lambda r: r.arrival)
            for request in running:
                self._release(request)
            self._new_state()  # cached prefix pages were in the lost pool too
            self.waiting.extendleft(reversed(running))
        events = []
        for request in involved:
            request.failures += 1
            if len(involved) == 1 or request.failures >= _MAX_FAILURES:
                if request in self.waiting:
                    self.waiting.remove(request)
                self._finish(request)
                events.append(Event(request.rid, [], True, "error", message))
            else:
                self._suspects.add(request.rid)
        return events

    def _page_bucket(self, feed: dict[int, int]) -> int:
        """The pages every row of this step attends over: what the longest row needs, rounded up to a power
        of two (at least `min_pages`, at most a slot's table); 1 for state-space models."""
        if not self.paged:
            return 1
        needed = max(math.ceil((self.slots[slot].computed + n) / self.page_size) for slot, n in feed.items())
        return _bucket(max(needed, self.min_pages), self.pages_per_slot)

    def _decode_rows(self, n: int) -> int:
        """Rows of the decode pass for `n` decoding requests: a power of two, at least 8 (or `max_slots`)."""
        return _bucket(max(n, min(_DECODE_ROWS_MIN, self.max_slots)), self.max_slots)

    def programs(self) -> int:
        """An upper bound on the step programs this engine compiles: decode row buckets (or no decode pass),
        times prefill row buckets (or none), times attended page buckets (less the empty step). Steps with a
        request that asked for log-probabilities use a second variant of each, passes with a StreamingLLM
        request another (its mask), and speculative requests add a verify pass (draft widths and rows in powers
        of two); none of these is counted here."""
        prefill = len({_bucket(n, self.prefill_rows) for n in range(1, self.prefill_rows + 1)})
        decode = len({self._decode_rows(n) for n in range(1, self.max_slots + 1)})
        pages = {1}
        if self.paged:
            pages = {_bucket(max(n, self.min_pages), self.pages_per_slot) for n in range(1, self.pages_per_slot + 1)}
        return ((decode + 1) * (prefill + 1) - 1) * len(pages)

    def _rows(self, feed: dict[int, int], rows: int, width: int, pages: int) -> Rows:
        """`feed` ({slot: tokens}) as `rows` rows of `width` tokens (padding rows name no slot) with the
        first `pages` entries of their block tables; a slot's tokens are its next uncomputed ones, then its
        draft tokens."""
        tokens = np.zeros((rows, width), np.int32)
        starts, counts = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        slots = np.full(rows, self.max_slots, np.int32)
        stream = np.zeros((3, rows), np.int32)  # StreamingMask: start, sinks, window
        stream[0] = np.iinfo(np.int32).max
        for row, (slot, n) in enumerate(sorted(feed.items())):
            request = self.slots[slot]
            tokens[row, :n] = (request.tokens[request.computed :] + self._drafts.get(slot, []))[:n]
            starts[row], counts[row], slots[row] = request.computed, n, slot
            if self.paged:  # a freed page (-1) is never attended; any id will do
                self.block_tables[slot, : len(request.pages)] = np.maximum(request.pages, 0)
            if request.streaming is not None:
                stream[:, row] = len(request.prompt), request.streaming.sinks, request.streaming.window
        tables = self.block_tables[np.minimum(slots, self.max_slots - 1)][:, :pages]
        streams = (stream[0] < np.iinfo(np.int32).max).any()
        streaming = StreamingMask(*(jnp.asarray(a) for a in stream)) if streams else None
        return Rows(*(jnp.asarray(a) for a in (tokens, tables, starts, counts, slots)), streaming)

    def _register_full_pages(self, request: _Request) -> None:
        """Enter the request's newly filled pages of its prompt into the prefix cache."""
        full = min(request.computed, len(request.prompt)) // self.page_size
        for i in range(request.registered, full):
            chunk = request.prompt[i * self.page_size : (i + 1) * self.page_size]
            request.prefix_key = self.table.register(request.pages[i], request.prefix_key, chunk)
        request.registered = max(request.registered, full)

    def _free_passed_pages(self, request: _Request) -> None:
        """StreamingLLM: once the prompt is in, release the pages no later query sees (every position in them
        past the sinks and before the window of the next position); their table entries become -1."""
        policy = request.streaming
        if policy is None or request.computed < len(request.prompt):
            return
        first = math.ceil(policy.sinks / self.page_size)  # pages from here on hold no sink
        last = (request.computed - policy.window + 1) // self.page_size  # pages before it end before the window
        passed = [i for i in range(first, min(last, len(request.pages))) if request.pages[i] >= 0]
        self.table.release([request.pages[i] for i in passed])
        for i in passed:
            request.pages[i] = -1

    def _snapshot(self, request: _Request) -> None:
        """Key the request's newly passed prompt boundaries; keep its state if it stands on one."""
        limit = min(request.computed, len(request.prompt) - 1)
        start = request.registered * self.page_size
        for end, key in self.table.keys(request.tokens, limit, request.prefix_key, start):
            request.prefix_key, request.registered = key, end // self.page_size
            if end == request.computed:
                entry = self.table.claim(key)
                if entry is not None:
                    self.store = state_snapshots.save(self.store, self.state, request.slot, entry)

    @staticmethod
    def _end(request: _Request, token: int) -> str | None:
        """Why `request` ends after emitting `token` (not an EOS), or None: "length", or "constraint" when its
        grammar is complete with no EOS id to end it, or no room left for one (as `generate`)."""
        matchers = request.matchers
        if matchers is not None:
            matchers.advance(np.asarray([token]))
            if matchers.finished()[0]:
                return "constraint"
        if len(request.out) < request.max_new_tokens:
            return None
        return "constraint" if matchers is not None and matchers.complete()[0] else "length"

    def _constrained(self, request: _Request, logits: jax.Array) -> int:
        """The next token of a constrained request from its logits [V]: masked (greedy argmax, or drawn with
        the request's key as `_sample`), or by rejection over the same perturbed logits (the same token)."""
        matchers = request.matchers
        if request.rejection:
            rule = request.sampling or Sampling.create(vocab_size=self.config.vocab_size)
            scores, best = _awrs_propose(logits[None], self._key(request), rule)
            return int(awrs.choose(matchers, scores, np.asarray(best), np.zeros(1, bool))[0][0])
        allowed = jnp.where(jnp.asarray(matchers.row_mask(0)), logits, -jnp.inf)
        return int(jnp.argmax(allowed)) if request.sampling is None else self._sample(request, allowed)

    @staticmethod
    def _key(request: _Request) -> jax.Array:
        """The key of `request`'s next sampled token: fold_in(key(seed), tokens emitted so far)."""
        return jax.random.fold_in(jax.random.key(request.seed), len(request.out))

    def _sample(self, request: _Request, logits: jax.Array) -> int:
        rule = request.sampling
        key = self._key(request)
        static = (rule.greedy, rule.top_k, rule.use_top_p, rule.use_min_p)
        return int(_draw(logits, rule.temperature, rule.top_p, rule.min_p, key, static))

    # -- driving it -------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether any request is waiting or running, or a cancellation is still to be reported."""
        return bool(self.requests or self._cancelled)

    def abort(self) -> list[int]:
        """Drop every request and start over with an empty pool or fresh states (after a failed step, whose
        donated state may be gone); returns the dropped ids. Nothing is reported for them."""
        dropped = list(self.requests)
        self.requests.clear()
        self.waiting.clear()
        self.slots = [None] * self.max_slots
        self._cancelled, self._final = [], {}
        self._suspects.clear()
        self._new_state()
        return dropped

    def run(self, max_steps: int | None = None) -> dict[int, list[int]]:
        """Step until every request has finished (or `max_steps` steps); returns {rid: tokens} of the
        requests that finished meanwhile (one that failed is left out; `errors[rid]` says why)."""
        done: dict[int, list[int]] = {}
        steps = 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            self._collect(done)
            steps += 1
        return done

    def _collect(self, done: dict[int, list[int]]) -> None:
        """One step; the whole output of each request that finishes in it (not cancelled, not failed) goes
        into `done`, and each failure into `self.errors`."""
        for event in self.step():
            if event.finish_reason == "error":
                self.errors[event.rid] = event.error
            elif event.finished and event.finish_reason != "cancelled":
                done[event.rid] = self._final[event.rid]

    def run_batch(self, prompts, gen_config: GenerationConfig | None = None) -> list[list[int]]:
        """Generate for a large offline batch, scheduled for prefix reuse (BatchLLM's global prefix sharing):
        prompts are ordered so shared prefixes are adjacent, the first prompt of each group of prompts sharing
        at least a page runs first, and the rest join once its prefix pages are cached. Returns each prompt's
        tokens, in the given order."""
        gen_config = GenerationConfig() if gen_config is None else gen_config
        prompts = [self._checked(p, gen_config)[0] for p in prompts]  # every prompt checked before any runs
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        leaders, followers = [], []
        for position, i in enumerate(order):
            previous = prompts[order[position - 1]] if position else []
            shared = len(os.path.commonprefix([previous, prompts[i]]))
            reuse = self.prefix_caching and (self.paged or self.num_snapshots) and shared >= self.page_size
            (followers if reuse else leaders).append(i)
        rids = {i: self.submit(prompts[i], gen_config) for i in leaders}
        done: dict[int, list[int]] = {}

        def prefilling():
            live = (self.requests.get(rid) for rid in rids.values())
            return any(r is not None and r.computed < len(r.prompt) for r in live)

        while followers and prefilling():
            self._collect(done)
        rids.update({i: self.submit(prompts[i], gen_config) for i in followers})
        while any(rid in self.requests for rid in rids.values()):
            self._collect(done)
        failed = [i for i in range(len(prompts)) if rids[i] not in done]
        if failed:
            raise RuntimeError(f"prompt {failed[0]} failed in the engine: {self.errors.get(rids[failed[0]])}")
        return [done[rids[i]] for i in range(len(prompts))]

    def stats(self) -> dict:
        """Running / waiting requests, pages used and free, bytes of the page pool (or states), tokens held
        in the cache by running requests, prefix-cache hits (prompt tokens not recomputed), state snapshots
        held (Mamba), preemptions, failed steps, draft tokens proposed and accepted (speculative requests),
        tokens generated and tokens per second of step time."""
        return {
            "running": sum(r is not None for r in self.slots),
            "waiting": len(self.waiting),
            "pages_used": self.table.used if self.paged else 0,
            "pages_free": self.table.available if self.paged else 0,
            "cache_bytes": sum(x.nbytes for x in jax.tree.leaves(self.state)),
            "tokens_held": sum(r.computed - self.page_size * r.pages.count(-1) for r in self.slots if r is not None),
            "prefix_cache_hit_tokens": self.prefix_hits,
            "state_snapshots": 0 if self.paged else len(self.table),
            "preemptions": self.preemptions,
            "failed_steps": self.failed_steps,
            "draft_tokens": self.drafted,
            "accepted_draft_tokens": self.accepted,
            "generated_tokens": self._generated,
            "tokens_per_second": self._generated / self._busy_seconds if self._busy_seconds else 0.0,
        }
