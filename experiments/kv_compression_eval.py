"""KV-cache compression on SmolLM2-135M-Instruct: passkey retrieval, perplexity / KL, cache bytes, decode speed.

Every method of `ssm_llm.kv` runs at 3 compression settings (e.g. keep 1/2, 1/4, 1/8 of the prompt, or
8/4/2-bit storage) next to the full cache. A config's compression ratio is *measured*: `cache_bytes` of
its compressed cache over that of the dense cache of the same length (prompt + decode room, float32 like
the weights, so 8-bit storage is ~1/4 of it); the plots use that ratio, not the nominal setting.
  (a) passkey retrieval: real English text (Python's language reference, `pydoc_data.topics`, from its
      start) with "The pass key is 71432. Remember it. 71432 is the pass key." inserted at several
      depths, for several prompt lengths up to the model's 8k context, ending with "What is the pass
      key? The pass key is"; greedy decoding of a few tokens, correct if their first number is the
      key. The full cache's accuracy is the baseline (a 135M model misses some).
  (b) perplexity and KL: a prefix of real text (the same reference, from its middle on: other topics)
      is prefilled and compressed, then the next N tokens are teacher-forced one decode step at a time
      through the (compressed) cache; reported: perplexity of those N tokens, the mean
      KL(full || compressed) of the next-token distributions, and how often both argmaxes agree.
  (c) cache bytes and their ratio to the full cache (per prompt length).
  (d) decode tokens/s at a long prompt (--speed-length), every config timed side by side in this run,
      interleaved repeat by repeat, each from its ready (compressed) cache:
      (N - 1) * batch / (t(N steps) - t(1 step)), medians (the call overhead and first step cancel out).
  (e) with --tasks: RULER-style multi-key needle and variable tracking (`long_context_tasks.py`, from the
      same text) at --task-lengths, --samples prompts each, prefilled once and answered greedily by every
      config (scores: a needle's number right; the fraction of a chain's variables named).
Work is shared: each prompt batch (all depths of one length) is prefilled ONCE with full attention
(`prefill_observed`, which also keeps the last queries that SnapKV-like methods score with), and that
dense cache is compressed by every config (`ssm_llm.kv.compress_cache`); decoding is a jitted loop of
`ssm_llm.forward` steps on the compressed cache (compiled once per config and shape).
Writes experiments/results/kv_compression_eval.json (+ .png) and prints a table last.

    python experiments/kv_compression_eval.py                      # full run (~30 min on 2 idle cores)
    python experiments/kv_compression_eval.py --methods streamingllm kivi
    python experiments/kv_compression_eval.py --quick --methods streamingllm   # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import long_context_tasks  # noqa: E402
import numpy as np  # noqa: E402
from bench_runners import machine_info  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402
from ssm_llm.cache import KVCache  # noqa: E402
from ssm_llm.kv import cache_bytes, compress_cache, describe  # noqa: E402
from ssm_llm.models.attention_lm import prefill_observed  # noqa: E402
from ssm_llm.models.lm_head import logits_from_hidden  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0


# ---------------------------------------------------------------- the method grid


@dataclasses.dataclass(frozen=True)
class Config:
    """One evaluated setting: `factory(prompt_len)` builds its policy (None: the full cache)."""

    method: str
    label: str
    factory: Callable[[int], object] | None

    @property
    def name(self) -> str:
        return self.method if self.factory is None else f"{self.method} {self.label}"

    def policy(self, prompt_len: int):
        if self.factory is None:
            return None
        try:
            return self.factory(prompt_len)
        except (TypeError, ValueError) as err:
            raise RuntimeError(
                f"method {self.method!r} ({self.label}): cannot build its policy for a {prompt_len}-token prompt: {err}"
            ) from err


def kv_class(method: str, name: str):
    """`ssm_llm.kv.<name>`, or an error naming the method (never silently skipped)."""
    kv = importlib.import_module("ssm_llm.kv")
    if not hasattr(kv, name):
        raise RuntimeError(
            f"method {method!r} needs ssm_llm.kv.{name}, which does not exist (yet); pick other methods with --methods"
        )
    return getattr(kv, name)


def _grid() -> dict[str, list[Config]]:
    """method -> its configs, written against the constructors of the `ssm_llm.kv` classes as they were
    being written (SnapKV(budget, window, kernel_size, pyramid), TokenSelect(k, sinks, local), InfLLM(blocks,
    block_size, representatives, sinks, local), ShadowKV(budget, chunk_size, rank, local_chunks, outlier_chunks),
    SqueezedAttention(budget, clusters, local, iterations), KIVI(bits,
    group_size, residual), RotateKV(bits), MixedPrecisionKV(high_bits, low_bits, important), GEAR(bits,
    rank, outlier_fraction), MiniCache(start_layer), XKV(rank, group_size)): adjust the arguments here
    if a constructor changes."""

    def entry(method, cls, settings):
        return [Config(method, label, lambda n, make=make: make(kv_class(method, cls), n)) for label, make in settings]

    keep = (2, 4, 8)  # keep 1/2, 1/4, 1/8 of the prompt
    bits = (8, 4, 2)

    def shadowkv(method, **options):
        return entry(
            method,
            "ShadowKV",
            [
                (
                    f"attend 1/{r}",
                    lambda c, n, r=r: c(
                        budget=max(8, (n // r - 32 - 8 * max(1, n // (64 * r))) // 8 * 8),
                        chunk_size=8,
                        local_chunks=4,
                        outlier_chunks=max(1, n // (64 * r)),
                        **options,
                    ),
                )
                for r in keep
            ],
        )

    def squeezed(method, tree=False):
        def make(c, n, r):
            budget, local = n // r - n // (4 * r), n // (4 * r)
            if not tree:
                return c(budget=budget, clusters=max(4, n // 64), local=local, iterations=8)
            coarse = max(1, n // 512)
            clusters = max(8, n // 64 // 8 * 8)
            keep_coarse = min(coarse, -(-4 * budget // 512))
            return c(
                budget=budget, clusters=clusters, local=local, iterations=8, coarse=coarse, coarse_keep=keep_coarse
            )

        return entry(method, "SqueezedAttention", [(f"attend 1/{r}", lambda c, n, r=r: make(c, n, r)) for r in keep])

    return {
        "streamingllm": entry(
            "streamingllm", "StreamingLLM", [(f"1/{r}", lambda c, n, r=r: c(budget=n // r, sinks=4)) for r in keep]
        ),
        "snapkv": entry("snapkv", "SnapKV", [(f"1/{r}", lambda c, n, r=r: c(budget=1 / r)) for r in keep]),
        "pyramidkv": entry(
            "pyramidkv", "SnapKV", [(f"1/{r}", lambda c, n, r=r: c(budget=1 / r, pyramid=True)) for r in keep]
        ),
        # TokenSelect keeps every token (it saves attention compute, not memory): the label is the
        # attended fraction (sinks + k selected + local window); its bytes ratio stays ~1.
        "tokenselect": entry(
            "tokenselect",
            "TokenSelect",
            [
                (f"attend 1/{r}", lambda c, n, r=r: c(k=n // r - n // (4 * r) - 16, sinks=16, local=n // (4 * r)))
                for r in keep
            ],
        ),
        # InfLLM keeps every token too; the label is the attended fraction: 16 sinks, a local window of a
        # quarter of it, and as many 32-token units (4 representatives each) as the rest holds, less the
        # block filling behind the window (at least one unit).
        "infllm": entry(
            "infllm",
            "InfLLM",
            [
                (
                    f"attend 1/{r}",
                    lambda c, n, r=r: c(
                        blocks=max(1, (n // r - 16 - n // (4 * r) - 32) // 32),
                        block_size=32,
                        representatives=4,
                        sinks=16,
                        local=n // (4 * r),
                    ),
                )
                for r in keep
            ],
        ),
        # ShadowKV keeps every value and a rank-64 SVD of the 192-wide pre-RoPE keys (the paper: 160 of 1024);
        # the label is the attended fraction: 8-token chunks, 4 local chunks, an eighth of it in outlier
        # chunks (at least one), the rest rebuilt per step.
        "shadowkv": shadowkv("shadowkv", rank=64),
        # Squeezed Attention keeps every token; the label is the attended fraction: a local window of a quarter
        # of it and the rest from the best of n / 64 k-means clusters per kv head.
        "squeezed": squeezed("squeezed"),
        # The same budgets looked up through a tree (the paper's hierarchical lookup): n / 512 coarse clusters
        # of 8 children each; per step the coarse clusters whose children hold ~4x the budget (at an average of
        # 64 tokens per child) have their children scored.
        "squeezed-tree": squeezed("squeezed-tree", tree=True),
        # The same with exact keys (rank=None): what the rank-64 keys cost, apart from the sparsity.
        "shadowkv-exact": shadowkv("shadowkv-exact", rank=None),
        # The same as "shadowkv" with the values in pinned_host memory, gathered there each step (on a CPU
        # the same RAM: what the host-side gather costs).
        "shadowkv-host": shadowkv("shadowkv-host", rank=64, offload_values=True),
        "kivi": entry(
            "kivi", "KIVI", [(f"{b}-bit", lambda c, n, b=b: c(bits=b, group_size=32, residual=128)) for b in bits]
        ),
        "rotatekv": entry("rotatekv", "RotateKV", [(f"{b}-bit", lambda c, n, b=b: c(bits=b)) for b in bits]),
        "mixedprecision": entry(
            "mixedprecision",
            "MixedPrecisionKV",
            [
                (
                    f"{hi}/{lo}-bit {imp:.0%}",
                    lambda c, n, hi=hi, lo=lo, imp=imp: c(high_bits=hi, low_bits=lo, important=imp),
                )
                for hi, lo, imp in ((8, 4, 0.2), (8, 2, 0.2), (4, 2, 0.1))
            ],
        ),
        "gear": entry(
            "gear", "GEAR", [(f"{b}-bit", lambda c, n, b=b: c(bits=b, rank=4, outlier_fraction=0.02)) for b in bits]
        ),
        # Cross-layer: MiniCache merges adjacent layer pairs from `start_layer` on (SmolLM2 has 30);
        # xKV keeps a rank-k key basis (values 1.5 k) per group of 4 layers (4 * 3 heads * 64 = 768 wide).
        "minicache": entry(
            "minicache", "MiniCache", [(f"from layer {s}", lambda c, n, s=s: c(start_layer=s)) for s in (20, 10, 0)]
        ),
        "xkv": entry("xkv", "XKV", [(f"rank {k}", lambda c, n, k=k: c(rank=k, group_size=4)) for k in (256, 128, 64)]),
    }


GRID = _grid()
FULL = Config("full", "1", None)


def select_configs(methods: list[str]) -> list[Config]:
    """The full-cache baseline plus every config of `methods`."""
    unknown = [m for m in methods if m not in GRID]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(GRID)}")
    return [FULL] + [c for m in methods for c in GRID[m]]


# ---------------------------------------------------------------- real text


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@functools.cache
def reference_text() -> str:
    """Python's language reference (the topics `help()` shows, ~465k characters of English prose)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def text_ids(tokenizer, tokens: int, start: float) -> list[int]:
    """At least `tokens` tokens of the reference text, from the fraction `start` of it on."""
    text = reference_text()
    first = int(start * len(text))
    ids = encode(tokenizer, text[first : first + 6 * tokens])
    if len(ids) < tokens:
        raise ValueError(f"the reference text has only {len(ids)} tokens from {start:.0%} on, {tokens} needed")
    return ids


INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about it at the end.\n\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, hay: list[int], hay_text: list[str], length: int, depth: float, key: int) -> list[int]:
    """Exactly `length` tokens: intro, haystack with the needle at `depth` (moved back to the previous
    line break, if one is within 64 tokens), question. `hay_text[i]`: the text of token hay[i]."""
    intro, question = encode(tokenizer, INTRO), encode(tokenizer, QUESTION)
    needle = encode(tokenizer, NEEDLE.format(key=key))
    fill = length - len(intro) - len(needle) - len(question)
    if fill < 1:
        raise ValueError(f"a {length}-token passkey prompt leaves no room for the haystack")
    at = int(depth * fill)
    breaks = [i + 1 for i in range(max(0, at - 64), at) if "\n" in hay_text[i]]
    at = breaks[-1] if breaks else at
    return intro + hay[:at] + needle + hay[at:fill] + question


# ---------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnames=("config", "window"))
def prefill(params, config, tokens, window: int):
    """Full-attention prefill of `tokens: [B, T]` (no padding). Returns the last logits [B, V], the
    dense prompt cache and the observation of the last `window` queries."""
    batch, steps = tokens.shape
    cache = ssm_llm.init_cache(config, batch, steps, params["embed"].dtype)
    counts = jnp.full((batch,), steps, jnp.int32)
    h, cache, observation = prefill_observed(params, config, tokens, cache, counts, window)
    return logits_from_hidden(params, config, h[:, -1]), cache, observation


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_len"))
def decode_cache(config, policy, max_len: int, dense: KVCache, observation):
    """The decode cache of a config: the dense prompt cache padded to `max_len` (policy None), or its
    compressed form (`compress_cache`, the observation cut to the policy's own window)."""
    if policy is None:
        pad = [(0, 0)] * 3 + [(0, max_len - dense.max_len), (0, 0)]
        return KVCache(k=jnp.pad(dense.k, pad), v=jnp.pad(dense.v, pad), lengths=dense.lengths)
    window = policy.observation_window
    if window:
        observation = observation.replace(
            queries=observation.queries[:, :, -window:], positions=observation.positions[:, -window:]
        )
    return compress_cache(config, dense, policy, max_len, observation if window else None)


@functools.partial(jax.jit, static_argnames=("config", "max_steps"))
def greedy(params, config, cache, first, steps, max_steps: int):
    """`steps` (traced, <= max_steps) greedy decode steps on `cache` after the tokens `first: [B]`.
    Returns the tokens [B, max_steps + 1] (first included; unused columns 0)."""
    out = jnp.zeros((first.shape[0], max_steps + 1), jnp.int32).at[:, 0].set(first)

    def step(i, state):
        tok, cache, out = state
        logits, cache = ssm_llm.forward(params, config, tok[:, None], cache)
        tok = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return tok, cache, out.at[:, i + 1].set(tok)

    return jax.lax.fori_loop(0, steps, step, (first, cache, out))[2]


@functools.partial(jax.jit, static_argnames=("config",))
def teacher_forced(params, config, cache, tokens):
    """Feed `tokens: [B, N]` to `cache` one decode step at a time; returns the next-token log-probs
    [N, B, V]."""

    def step(cache, tok):
        logits, cache = ssm_llm.forward(params, config, tok[:, None], cache)
        return cache, jax.nn.log_softmax(logits[:, 0].astype(jnp.float32))

    return jax.lax.scan(step, cache, tokens.T)[1]


def continuation_metrics(logp: np.ndarray, targets: np.ndarray, reference: np.ndarray | None) -> dict:
    """logp, reference: [N, B, V] log-probs (reference: the full cache's); targets: [B, N] the true next
    tokens. Perplexity, and versus the reference: mean KL(reference || logp) and argmax agreement."""
    nll = -np.take_along_axis(logp, targets.T[..., None], axis=-1)[..., 0]
    out = {"nll": float(nll.mean()), "perplexity": float(np.exp(nll.mean()))}
    if reference is not None:
        kl = (np.exp(reference) * (reference - logp)).sum(-1)
        out.update(
            kl=float(kl.mean()),
            kl_max=float(kl.max()),
            top1_agreement=float((reference.argmax(-1) == logp.argmax(-1)).mean()),
        )
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


# ---------------------------------------------------------------- the three measurements


def observed_prefill(params, config, policies: dict, tokens: np.ndarray):
    """`prefill` keeping as many last queries as the most demanding policy observes (at least 1, at most the
    prompt: InfLLM observes all of it)."""
    window = min(max([1] + [p.observation_window for p in policies.values() if p is not None]), tokens.shape[1])
    start = time.perf_counter()
    out = jax.block_until_ready(prefill(params, config, jnp.asarray(tokens), window))
    return out, time.perf_counter() - start


def run_passkey(params, config, tokenizer, configs, args, rng, checkpoint=lambda rows: None):
    """(a) + (c) + (d): one prefill per length (a batch of all depths), every config decoding from it;
    `checkpoint(rows)` is called after each length so a long run's finished lengths are never lost."""
    hay = text_ids(tokenizer, max(args.lengths), start=0.0)
    hay_text = tokenizer.batch_decode([[t] for t in hay])
    max_steps = max(args.answer_tokens - 1, args.speed_steps)
    rows, speed = {}, None
    for length in tqdm(args.lengths, desc="passkey lengths"):
        keys = [int(k) for k in rng.integers(10_000, 100_000, len(args.depths))]
        prompts = [
            passkey_prompt(tokenizer, hay, hay_text, length, d, k) for d, k in zip(args.depths, keys, strict=True)
        ]
        policies = {c.name: c.policy(length) for c in configs}
        (logits, dense, observation), prefill_s = observed_prefill(params, config, policies, np.asarray(prompts))
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        max_len = length + max_steps + 1
        row = {"prefill_s_incl_compile": prefill_s, "keys": keys, "configs": {}}
        for c in tqdm(configs, desc=f"{length} tokens", leave=False):
            policy = policies[c.name]
            cache = decode_cache(config, policy, max_len, dense, observation)
            size = cache_bytes(cache)
            row.setdefault("full_bytes", size)  # configs[0] is the full cache
            out = greedy(params, config, cache, first, args.answer_tokens - 1, max_steps)
            texts = tokenizer.batch_decode(np.asarray(out)[:, : args.answer_tokens].tolist())
            found = [re.search(r"\d+", t) for t in texts]
            correct = [m is not None and m.group() == str(k) for m, k in zip(found, keys, strict=True)]
            row["configs"][c.name] = {
                "policy": describe(policy),
                "capacity": getattr(cache, "capacity", max_len),
                "cache_bytes": size,
                "ratio": size / row["full_bytes"],
                "answers": texts,
                "correct": correct,
                "accuracy": float(np.mean(correct)),
            }
        if length == args.speed_length:
            speed = measure_speed(params, config, policies, max_len, dense, observation, first, max_steps, args)
        rows[length] = row
        checkpoint(rows)
        del dense, observation
    return rows, speed


def run_tasks(params, config, tokenizer, configs, args, rng):
    """(e): each task at each length, one prefill of its --samples prompts, every config's greedy answers
    from its own compressed cache, scored."""
    hay = text_ids(tokenizer, max(args.task_lengths), start=0.0)
    out = {}
    for task in args.tasks:
        build, score, answer_tokens = long_context_tasks.TASKS[task]
        rows = out[task] = {}
        for length in tqdm(args.task_lengths, desc=task):
            built = [build(tokenizer, hay, length, rng) for _ in range(args.samples)]
            expected = [e for _, e in built]
            policies = {c.name: c.policy(length) for c in configs}
            (logits, dense, observation), _ = observed_prefill(
                params, config, policies, np.asarray([p for p, _ in built])
            )
            first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            row = rows[length] = {"expected": expected, "configs": {}}
            for c in tqdm(configs, desc=f"{length} tokens", leave=False):
                cache = decode_cache(config, policies[c.name], length + answer_tokens, dense, observation)
                tokens = greedy(params, config, cache, first, answer_tokens - 1, answer_tokens - 1)
                texts = tokenizer.batch_decode(np.asarray(tokens).tolist())
                scores = [score(t, e) for t, e in zip(texts, expected, strict=True)]
                row["configs"][c.name] = {"answers": texts, "scores": scores, "score": float(np.sum(scores))}
            del dense, observation
    return out


def measure_speed(params, config, policies, max_len, dense, observation, first, max_steps, args):
    """(d): decode tok/s of every config on one prompt batch, interleaved repeat by repeat."""
    n, batch = args.speed_steps, first.shape[0]
    times = {name: {"t_1": [], "t_n": []} for name in policies}
    for _ in tqdm(range(args.repeats), desc="decode speed", leave=False):
        for name, policy in policies.items():
            cache = jax.block_until_ready(decode_cache(config, policy, max_len, dense, observation))
            for steps, key in ((1, "t_1"), (n, "t_n")):
                times[name][key].append(
                    timed(lambda cache=cache, steps=steps: greedy(params, config, cache, first, steps, max_steps))
                )
    out = {}
    for name, t in times.items():
        t1, tn = statistics.median(t["t_1"]), statistics.median(t["t_n"])
        tok_s = (n - 1) * batch / (tn - t1) if tn > t1 else float("nan")  # nan: lost in timing noise
        out[name] = {"decode_tok_s": tok_s, "t_1_s": t1, "t_n_s": tn, **t}
    full = out[FULL.name]["decode_tok_s"]
    for row in out.values():
        row["vs_full"] = row["decode_tok_s"] / full
    return {"prompt_tokens": args.speed_length, "batch": batch, "n": n, "repeats": args.repeats, "configs": out}


def run_perplexity(params, config, tokenizer, configs, args):
    """(b): prefix prefilled once, every config teacher-forces the continuation from it."""
    chunk = args.ppl_prefix + args.ppl_tokens + 1
    ids = text_ids(tokenizer, chunk * args.ppl_docs, start=0.5)[: chunk * args.ppl_docs]
    ids = np.asarray(ids).reshape(args.ppl_docs, chunk)
    prefix, fed, targets = ids[:, : args.ppl_prefix], ids[:, args.ppl_prefix : -1], ids[:, args.ppl_prefix + 1 :]
    policies = {c.name: c.policy(args.ppl_prefix) for c in configs}
    (_, dense, observation), _ = observed_prefill(params, config, policies, prefix)
    max_len = args.ppl_prefix + args.ppl_tokens
    out, reference, full_bytes = {}, None, None
    for c in tqdm(configs, desc="perplexity"):
        policy = policies[c.name]
        cache = decode_cache(config, policy, max_len, dense, observation)
        full_bytes = full_bytes or cache_bytes(cache)  # configs[0] is the full cache
        logp = np.asarray(teacher_forced(params, config, cache, jnp.asarray(fed)))
        out[c.name] = {
            "policy": describe(policy),
            "cache_bytes": cache_bytes(cache),
            "ratio": cache_bytes(cache) / full_bytes,
            **continuation_metrics(logp, targets, reference),
        }
        reference = logp if reference is None else reference
    return {
        "prefix_tokens": args.ppl_prefix,
        "tokens": args.ppl_tokens,
        "docs": args.ppl_docs,
        "full_bytes": full_bytes,
        "configs": out,
    }


# ---------------------------------------------------------------- driver


def estimate_minutes(args, n_configs: int) -> float:
    """A rough cost model of a SmolLM2 run on an idle 2-core CPU, fitted to measured timings: prefill of
    one row of k * 1024 tokens ~0.7 k + 0.9 k^2 s; ~2.5 s to compile one config per shape; a decode step
    of a batch of b rows at k * 1024 tokens ~0.06 + 0.012 k b s with the full cache (compressed caches
    are faster, their compression itself is not counted); --tasks alike."""
    k = np.asarray(args.lengths + [args.ppl_prefix]) / 1024
    rows = np.asarray([len(args.depths)] * len(args.lengths) + [args.ppl_docs])
    step = 0.06 + 0.012 * k * rows
    prefill_s = float(np.sum(rows * (0.7 * k + 0.9 * k**2))) + 10 * len(k)
    compile_s = 2.5 * n_configs * len(k)
    speed_step = step[args.lengths.index(args.speed_length)]
    decode_s = n_configs * (
        args.answer_tokens * float(np.sum(step[:-1]))
        + args.ppl_tokens * step[-1]
        + args.repeats * (args.speed_steps + 1) * speed_step
    )
    for task in args.tasks:
        answer = long_context_tasks.TASKS[task][2]
        for k in np.asarray(args.task_lengths) / 1024:
            prefill_s += args.samples * (0.7 * k + 0.9 * k**2) + 10
            decode_s += n_configs * answer * (0.06 + 0.012 * k * args.samples)
            compile_s += 2.5 * n_configs
    return (prefill_s + compile_s + decode_s) / 60


def tiny_model(vocab_size: int):
    """A random 2-layer model with the tokenizer's vocabulary (smoke tests only)."""
    config = ssm_llm.ModelConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    return config, ssm_llm.init_params(config, jax.random.PRNGKey(SEED))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=sorted(GRID),
        metavar="METHOD",
        help=f"methods to evaluate besides the full cache (default: all of {sorted(GRID)})",
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[1024, 2048, 4096, 8160],
        help="passkey prompt lengths in tokens (the longest plus the decoded tokens must fit the "
        "model's 8192-position context)",
    )
    parser.add_argument(
        "--depths",
        nargs="+",
        type=float,
        default=[0.1, 0.5, 0.9],
        help="where the needle sits in the haystack (fractions); one prompt batch row each",
    )
    parser.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens decoded per passkey answer")
    parser.add_argument("--ppl-prefix", type=int, default=2048, help="prefix tokens prefilled before teacher forcing")
    parser.add_argument("--ppl-tokens", type=int, default=128, help="teacher-forced tokens scored per document")
    parser.add_argument("--ppl-docs", type=int, default=2, help="documents (batch rows) of the perplexity test")
    parser.add_argument("--speed-length", type=int, default=4096, help="the passkey length timed for decode speed")
    parser.add_argument("--speed-steps", type=int, default=16, help="N of the decode speed measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the decode speed measurement")
    parser.add_argument(
        "--tasks",
        nargs="*",
        default=[],
        choices=sorted(long_context_tasks.TASKS),
        help="RULER-style tasks to add (default: none; each costs a prefill per length and a decode per config)",
    )
    parser.add_argument(
        "--task-lengths", nargs="+", type=int, default=[4096, 8160], help="prompt lengths of the --tasks"
    )
    parser.add_argument("--samples", type=int, default=3, help="prompts per task and length")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="256/512-token prompts at 2 depths and a short perplexity window, to check the script "
        "works in ~1 min; writes "
        "kv_compression_eval_quick.json so real results are never overwritten",
    )
    parser.add_argument(
        "--tiny-model",
        action="store_true",
        help="a random 2-layer model with SmolLM2's tokenizer instead of SmolLM2 (smoke tests)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/kv_compression_eval[_quick].json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.depths, args.speed_length = [256, 512], [0.25, 0.75], 512
        args.ppl_prefix, args.ppl_tokens, args.repeats, args.speed_steps = 256, 16, 2, 8
        args.task_lengths, args.samples = [512], 2
    if args.speed_length not in args.lengths:
        parser.error(f"--speed-length {args.speed_length} must be one of --lengths {args.lengths}")
    if min(args.answer_tokens, args.speed_steps, args.ppl_docs, args.repeats) < 1 or args.speed_steps < 2:
        parser.error("need --answer-tokens, --ppl-docs, --repeats >= 1 and --speed-steps >= 2")
    if min(args.depths) < 0 or max(args.depths) > 1:
        parser.error(f"depths must lie in [0, 1], got {args.depths}")
    try:
        configs = select_configs(args.methods)
    except ValueError as err:
        parser.error(str(err))
    if args.out is None:
        args.out = RESULTS / ("kv_compression_eval_quick.json" if args.quick else "kv_compression_eval.json")
    wall_start = time.perf_counter()

    path = ssm_llm.default_model_path()
    tokenizer = converters.load_tokenizer(path)
    config, params = tiny_model(len(tokenizer)) if args.tiny_model else converters.load(path)
    model_name = "tiny random (2 layers)" if args.tiny_model else path.name
    longest = max(args.lengths) + max(args.answer_tokens - 1, args.speed_steps) + 1
    if args.tasks:
        longest = max(longest, max(args.task_lengths) + max(long_context_tasks.TASKS[t][2] for t in args.tasks))
    if longest > config.max_position_embeddings or args.ppl_prefix + args.ppl_tokens > config.max_position_embeddings:
        parser.error(
            f"the longest prompt plus its decoded tokens ({longest}) or the perplexity window "
            f"must fit the model's context of {config.max_position_embeddings}"
        )
    for length in sorted(set(args.lengths + [args.ppl_prefix])):  # fail before the expensive part
        for c in configs:
            c.policy(length)
    estimate = "" if args.tiny_model else f"; estimated ~{estimate_minutes(args, len(configs)):.0f} min on a 2-core CPU"
    print(f"{len(configs)} configs ({', '.join(['full'] + args.methods)}){estimate}")

    rng = np.random.default_rng(SEED)
    partial = args.out.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(rows):
        partial.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "passkey": {str(k): v for k, v in rows.items()}},
                indent=2,
            )
        )

    passkey, speed = run_passkey(params, config, tokenizer, configs, args, rng, checkpoint)
    perplexity = run_perplexity(params, config, tokenizer, configs, args)
    task_rows = run_tasks(params, config, tokenizer, configs, args, rng)
    summary = summarize(configs, passkey, perplexity, speed, task_rows)

    machine = machine_info()
    result = {
        "script": "experiments/kv_compression_eval.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seed": SEED,
        "machine": machine,
        "model": model_name,
        "dtype": str(params["embed"].dtype),
        "configs": [{"name": c.name, "method": c.method, "setting": c.label} for c in configs],
        "passkey": {str(k): v for k, v in passkey.items()},
        "perplexity": perplexity,
        "decode_speed": speed,
        "tasks": {t: {str(k): v for k, v in rows.items()} for t, rows in task_rows.items()},
        "summary": summary,
        "total_wall_s": time.perf_counter() - wall_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(configs, summary, args.out.with_suffix(".png"), model_name)
    partial.unlink(missing_ok=True)

    print(
        f"\n{model_name}, {result['dtype']}, {machine['cpu']} ({machine['cores']} cores, "
        f"jax {machine['jax_backend']}); results: {args.out}"
    )
    print(
        f"passkey: lengths {args.lengths} x depths {args.depths}; perplexity: {args.ppl_docs} x {args.ppl_tokens} "
        f"tokens after {args.ppl_prefix}; decode speed: {args.speed_length}-token prompts, batch {len(args.depths)}"
    )
    print(
        f"{'config':<32}{'bytes ratio':>12}{'passkey':>9}{'ppl':>9}{'KL':>9}{'top-1':>7}{'tok/s':>8}{'vs full':>8}"
        f"   passkey by length ({'/'.join(map(str, args.lengths))})"
    )
    for c in configs:
        s = summary[c.name]
        by_length = "/".join(f"{v:.0%}" for v in s["passkey_accuracy_by_length"].values())
        print(
            f"{c.name:<32}{s['ratio']:>12.3f}{s['passkey_accuracy']:>9.0%}{s['perplexity']:>9.2f}"
            f"{s.get('kl', 0.0):>9.4f}{s.get('top1_agreement', 1.0):>7.0%}{s['decode_tok_s']:>8.1f}"
            f"{s['speed_vs_full']:>7.2f}x   {by_length}"
        )
    for task, rows in task_rows.items():
        lengths = list(rows)
        print(f"{task} ({args.samples} prompts per length; score by length {'/'.join(map(str, lengths))})")
        for c in configs:
            print(f"  {c.name:<30}" + " / ".join(f"{rows[n]['configs'][c.name]['score']:.2f}" for n in lengths))
    print(f"total {result['total_wall_s'] / 60:.1f} min")


def summarize(configs, passkey, perplexity, speed, task_rows=None) -> dict:
    """Per config: bytes ratio (mean over the passkey lengths), passkey accuracy (all lengths and
    depths), perplexity / KL / top-1 agreement, decode tok/s and its ratio to the full cache, and each
    task's summed score by length."""
    out = {}
    for c in configs:
        rows = [passkey[length]["configs"][c.name] for length in passkey]
        p, s = perplexity["configs"][c.name], speed["configs"][c.name]
        out[c.name] = {
            "method": c.method,
            "setting": c.label,
            "ratio": float(np.mean([r["ratio"] for r in rows])),
            "ppl_ratio": p["ratio"],
            "passkey_accuracy": float(np.mean([r["correct"] for r in rows])),
            "passkey_accuracy_by_length": {str(k): r["accuracy"] for k, r in zip(passkey, rows, strict=True)},
            "perplexity": p["perplexity"],
            "decode_tok_s": s["decode_tok_s"],
            "speed_vs_full": s["vs_full"],
            **{k: p[k] for k in ("kl", "top1_agreement") if k in p},
            "tasks": {
                t: {str(n): r["configs"][c.name]["score"] for n, r in rows.items()}
                for t, rows in (task_rows or {}).items()
            },
        }
    return out


def plot(configs, summary, path, model_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("passkey_accuracy", "ratio", "passkey accuracy", False),
        ("perplexity", "ppl_ratio", "perplexity", False),
        ("kl", "ppl_ratio", "KL(full || compressed), nats/token", True),
        ("speed_vs_full", "ratio", "decode tok/s / full cache's", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    full = summary[FULL.name]
    methods = list(dict.fromkeys(c.method for c in configs if c.factory is not None))
    for ax, (key, x_key, title, log_y) in zip(axes.flat, panels, strict=True):
        for i, method in enumerate(methods):
            points = sorted((summary[c.name][x_key], summary[c.name][key]) for c in configs if c.method == method)
            ax.plot(*zip(*points, strict=True), "o-", color=f"C{i}", label=method)
        if key in full:
            ax.axhline(full[key], color="gray", linestyle="--", linewidth=1)
            ax.plot([1.0], [full[key]], "k*", markersize=10, label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xlim(right=1.3)  # the full cache sits at 1
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("cache bytes / full cache bytes")
        ax.set_title(title, fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"KV-cache compression, {model_name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
