"""Fuzz the public API, the loaders, the text specs and the CLI with hypothesis, for a fixed time budget.

Every target is a hypothesis strategy producing an input, plus an ORACLE written here, independently of the
library's own checks, that says whether the input is valid and, if it is, what a correct result must satisfy.
Each example runs in a worker subprocess (multiprocessing, spawn) that the parent kills and restarts when the
example passes the per-example timeout, so a real hang is recorded, not suffered. Outcomes:

    ok      valid input, and the result satisfies the oracle
    clear   invalid input refused with ValueError / TypeError / FileNotFoundError / FileExistsError /
            MemoryError / KeyError raised from a frame in ssm_llm/, converters/ or pallas_kernels/ (or by
            Python's own argument binding of a library callable), with a message of at least 10 characters;
            for the CLI: exit status 2 with one `ssm-llm: error: ...` (or argparse usage) line, no traceback
    unclear an expected exception type raised from a third-party frame (jax, numpy, orbax, transformers, ...)
            or with an empty / near-empty message
    crash   any other exception type, a worker that died, a valid input refused, or CLI exit status 1 or a
            traceback on stderr
    silent  an invalid input accepted, or a valid input whose result breaks the oracle
    hang    the example ran past --timeout seconds
    unsafe  a marker file created by a checkpoint, a file outside the model directory read (a canary), or a
            file outside the destination changed or deleted

Targets: generate_options, generate_kv, generate_speculative (GenerationConfig + generate on tiny Llama /
Mamba / Mamba-2 models: option values of random types, prompt shapes, callbacks, KV policies and drafters
with random parameters; greedy output of lossless options must equal plain greedy generate), forward and
forward_jit (random token arrays / token_counts / caches; under jax.jit a bad row must give NaN logits,
with checkify a checkify error), load_safetensors (header and byte mutations, judged against the official
`safetensors` reader and a canonical rewrite of what it reads), load_config_json (mutated config.json, a
load must reproduce the JSON's values), load_shard_index (weight_map entries pointing outside the model
directory at a canary), load_pickle (pytorch_model.bin whose pickle would create a marker file),
load_gguf (metadata values / types / tensor infos mutated through GGUFWriter, bytes flipped / truncated),
load_orbax (ssm_llm_config.json edited, files under params/ deleted or corrupted), spec_policy /
spec_drafter (text specs from plausible fragments) and cli (random argv, always with --model at a tiny
checkpoint: exit status 0/2/130 only, never a traceback).

Writes experiments/results/fuzz_inputs.json: machine, budget, counts per target and outcome, totals, and a
reproducer (target, input repr, exception, first message line) for every outcome other than ok / clear
(capped per outcome). Prints a table last.

    python experiments/fuzz_inputs.py                         # 20-minute run over every target
    python experiments/fuzz_inputs.py --budget-seconds 60 --targets spec_policy,forward
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
THIS_FILE = str(Path(__file__).resolve())
SEED = 0
OUTCOMES = ("ok", "clear", "unclear", "crash", "silent", "hang", "unsafe")
BAD_OUTCOMES = ("unclear", "crash", "silent", "hang", "unsafe")
EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, MemoryError, KeyError)
OWN_PACKAGES = ("ssm_llm", "converters", "pallas_kernels")
FINDINGS_PER_OUTCOME = 40
MIN_MESSAGE = 10

# Target -> share of the budget (compile-bound targets get more time).
TARGETS = {
    "spec_policy": 0.5,
    "spec_drafter": 0.5,
    "generate_options": 2.0,
    "generate_kv": 1.5,
    "generate_speculative": 1.5,
    "forward": 1.0,
    "forward_jit": 1.0,
    "load_safetensors": 1.0,
    "load_config_json": 1.0,
    "load_shard_index": 0.5,
    "load_pickle": 0.5,
    "load_gguf": 1.0,
    "load_orbax": 1.0,
    "cli": 1.5,
}

# The tiny models every API target runs (vocabulary 101 so that the CLI's word-level tokenizer fits).
VOCAB = 101
CONTEXT = 128
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=CONTEXT,
    bos_token_id=1,
    eos_token_ids=(2,),
)
MAMBA = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, state_size=8, intermediate_size=64, eos_token_ids=(2,))
MAMBA2 = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    state_size=8,
    intermediate_size=64,
    num_heads=4,
    head_dim=16,
    n_groups=2,
    chunk_size=8,
    eos_token_ids=(2,),
)
HF_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
MAX_NEW_TOKENS = 2**20  # ssm_llm.generation.MAX_NEW_TOKENS, the stated ceiling (checked at worker start)
MAX_TREE_NODES = 1024  # ssm_llm.speculative.tree.MAX_TREE_NODES
MAX_NGRAM = 64
MAX_LAYERS = 4096  # ssm_llm.config.MAX_LAYERS


@dataclasses.dataclass(frozen=True)
class Special:
    """A placeholder in a payload for an object the worker builds (a policy where a drafter belongs, ...)."""

    name: str


class FuzzCallbackError(Exception):
    """Raised by the fuzzer's own on_token callbacks: generate must hand it back unchanged."""


# =============================================================================================== oracles
# Independent statements of what is valid. Each returns None (valid) or a reason (invalid); UNKNOWN means
# either a result or a clear refusal is acceptable (the spec does not decide).

UNKNOWN = "unknown"


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v) -> bool:
    """A finite real number (ints, floats, numpy numbers, fractions), not a bool."""
    if isinstance(v, (bool, np.bool_)):
        return False
    if not isinstance(v, (int, float, np.integer, np.floating, Fraction)):
        return False
    return math.isfinite(float(v)) if not isinstance(v, (int, np.integer)) else True


def int_in(v, lo=None, hi=None) -> bool:
    return is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def token_ids_problem(value, vocab: int | None):
    """eos_token_ids: an int or a non-string iterable of ints, each >= 0 (and < vocab when given)."""
    if isinstance(value, (str, bytes)):
        return "token ids given as a string"
    items = [value] if is_int(value) else None
    if items is None:
        try:
            items = list(value)
        except TypeError:
            return f"token ids of type {type(value).__name__}"
    for v in items:
        if not int_in(v, 0, None if vocab is None else vocab - 1):
            return f"token id {v!r} not an int in [0, {vocab})"
    return None


GEN_DEFAULTS = dict(
    max_new_tokens=64,
    temperature=0.0,
    top_k=None,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    eos_token_ids=None,
    max_len=None,
    kv_compression=None,
    speculative=None,
)


def gen_config_problem(kwargs: dict, policy_ok: bool, drafter_ok: bool):
    """GenerationConfig(**kwargs) on its own (policy_ok / drafter_ok: the objects are real ones)."""
    unknown = set(kwargs) - set(GEN_DEFAULTS)
    if unknown:
        return f"unknown option(s) {sorted(unknown)}"
    k = {**GEN_DEFAULTS, **kwargs}
    if not int_in(k["max_new_tokens"], 1, MAX_NEW_TOKENS):
        return "max_new_tokens not an int in [1, MAX_NEW_TOKENS]"
    if not (is_real(k["temperature"]) and k["temperature"] >= 0):
        return "temperature not a finite number >= 0"
    if k["top_k"] is not None and not int_in(k["top_k"], 0):
        return "top_k not None or an int >= 0"
    if not (is_real(k["top_p"]) and 0 < k["top_p"] <= 1):
        return "top_p not in (0, 1]"
    if not (is_real(k["min_p"]) and 0 <= k["min_p"] < 1):
        return "min_p not in [0, 1)"
    if not int_in(k["seed"], 0, 2**32 - 1):
        return "seed not an int in [0, 2**32)"
    if k["eos_token_ids"] is not None:
        problem = token_ids_problem(k["eos_token_ids"], None)
        if problem:
            return problem
    if k["max_len"] is not None and not int_in(k["max_len"], 1):
        return "max_len not None or an int >= 1"
    if k["kv_compression"] is not None and not policy_ok:
        return "kv_compression is not a KV policy"
    if k["speculative"] is not None and not drafter_ok:
        return "speculative is not a drafter"
    if k["kv_compression"] is not None and k["speculative"] is not None:
        return "kv_compression and speculative together"
    return None


def prompts_problem(prompts, vocab: int):
    """A non-empty list/tuple/array of non-empty flat sequences of int ids in [0, vocab)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple, np.ndarray)) or len(prompts) == 0:
        return "prompts not a non-empty list of token-id lists"
    for prompt in prompts:
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or prompt.dtype == bool or not np.issubdtype(prompt.dtype, np.integer):
                return "a prompt array is not a 1-D int array"
            items = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            items = list(prompt)
        else:
            return f"a prompt of type {type(prompt).__name__}"
        if not items:
            return "an empty prompt"
        for v in items:
            if not int_in(v, 0, vocab - 1):
                return f"prompt id {v!r} not an int in [0, {vocab})"
    return None


# ------------------------------------------------------------------------------------------- KV policies

POLICY_BITS = (2, 4, 8, 16)


def _budget_ok(v) -> bool:
    """A token count (int >= 1) or a kept fraction (a Python/np.float64 float in (0, 1])."""
    return int_in(v, 1) or (isinstance(v, float) and 0 < v <= 1)


def _fraction(v) -> bool:
    return is_real(v) and 0 <= v <= 1


def _channel_groups_ok(bits, group, width) -> bool:
    if bits == 16:
        return True
    g = min(group, width)
    return width % g == 0 and width % (8 // bits) == 0


POLICY_FIELDS = {
    "SnapKV": dict(
        required=("budget",), defaults=dict(window=32, kernel_size=5, pooling="max", pyramid=False, beta=20.0)
    ),
    "StreamingLLM": dict(required=("budget",), defaults=dict(sinks=4, positions="cache", distance_ceiling=None)),
    "KIVI": dict(required=(), defaults=dict(bits=2, group_size=32, residual=128)),
    "GEAR": dict(required=(), defaults=dict(bits=4, rank=4, outlier_fraction=0.01, group_size=32)),
    "MiniCache": dict(required=(), defaults=dict(start_layer=None, t=0.6, retention_threshold=0.05, max_retained=0.1)),
    "MixedPrecisionKV": dict(
        required=(), defaults=dict(high_bits=8, low_bits=2, important=0.2, window=32, group_size=32)
    ),
    "RotateKV": dict(required=(), defaults=dict(bits=2, group_size=128, sinks=4, head_group=1)),
    "TokenSelect": dict(required=("k",), defaults=dict(sinks=128, local=512, threshold=0.9)),
    "XKV": dict(required=("rank",), defaults=dict(group_size=2, value_rank=None)),
}


def policy_ctor_problem(name: str, kwargs: dict):
    spec = POLICY_FIELDS[name]
    unknown = set(kwargs) - set(spec["required"]) - set(spec["defaults"])
    if unknown:
        return f"{name}: unknown parameter(s) {sorted(unknown)}"
    missing = [r for r in spec["required"] if r not in kwargs]
    if missing:
        return f"{name}: missing {missing}"
    k = {**spec["defaults"], **kwargs}

    def bits(v):
        return is_int(v) and v in POLICY_BITS

    if name == "SnapKV":
        if not _budget_ok(k["budget"]) or not int_in(k["window"], 1):
            return "SnapKV budget/window"
        if is_int(k["budget"]) and k["window"] > k["budget"]:
            return "SnapKV window > budget"
        if not int_in(k["kernel_size"], 1) or k["kernel_size"] % 2 == 0:
            return "SnapKV kernel_size"
        if not (isinstance(k["pooling"], str) and k["pooling"] in ("max", "avg")):
            return "SnapKV pooling"
        if not isinstance(k["pyramid"], (bool, np.bool_)):
            return "SnapKV pyramid"
        if not (is_real(k["beta"]) and k["beta"] >= 1):
            return "SnapKV beta"
    elif name == "StreamingLLM":
        if not int_in(k["budget"], 1) or not int_in(k["sinks"], 0) or k["sinks"] >= k["budget"]:
            return "StreamingLLM budget/sinks"
        if not (isinstance(k["positions"], str) and k["positions"] in ("cache", "original")):
            return "StreamingLLM positions"
        if k["distance_ceiling"] is not None and not int_in(k["distance_ceiling"], 1):
            return "StreamingLLM distance_ceiling"
    elif name == "KIVI":
        if not bits(k["bits"]) or not int_in(k["group_size"], 1) or not int_in(k["residual"], 1):
            return "KIVI bits/group_size/residual"
        if k["residual"] % k["group_size"]:
            return "KIVI residual not a multiple of group_size"
    elif name == "GEAR":
        if not bits(k["bits"]) or not int_in(k["rank"], 0) or not int_in(k["group_size"], 1):
            return "GEAR bits/rank/group_size"
        if not (is_real(k["outlier_fraction"]) and 0 <= k["outlier_fraction"] < 1):
            return "GEAR outlier_fraction"
    elif name == "MiniCache":
        if k["start_layer"] is not None and not int_in(k["start_layer"], 0):
            return "MiniCache start_layer"
        if not _fraction(k["t"]) or not _fraction(k["retention_threshold"]):
            return "MiniCache t/retention_threshold"
        m = k["max_retained"]
        if not ((isinstance(m, float) and _fraction(m)) or int_in(m, 0)):
            return "MiniCache max_retained"
    elif name == "MixedPrecisionKV":
        if not bits(k["high_bits"]) or not bits(k["low_bits"]) or k["low_bits"] > k["high_bits"]:
            return "MixedPrecisionKV bits"
        if not _budget_ok(k["important"]) or not int_in(k["window"], 1) or not int_in(k["group_size"], 1):
            return "MixedPrecisionKV important/window/group_size"
    elif name == "RotateKV":
        if (
            not bits(k["bits"])
            or not int_in(k["group_size"], 1)
            or not int_in(k["sinks"], 0)
            or not int_in(k["head_group"], 1)
        ):
            return "RotateKV parameters"
    elif name == "TokenSelect":
        if not int_in(k["k"], 1) or not int_in(k["sinks"], 0) or not int_in(k["local"], 0):
            return "TokenSelect k/sinks/local"
        t = k["threshold"]
        if t is not None and not (is_real(t) and -1 <= t <= 1):
            return "TokenSelect threshold"
    elif name == "XKV":
        if not int_in(k["rank"], 1) or not int_in(k["group_size"], 1):
            return "XKV rank/group_size"
        if k["value_rank"] is not None and not int_in(k["value_rank"], 1):
            return "XKV value_rank"
    return None


def policy_model_problem(name: str, kwargs: dict, lengths: list[int], padded: int):
    """The checks against the tiny Llama (head_dim 8, 2 kv heads, 2 layers, context 128) for prompts of
    `lengths` tokens padded to `padded`."""
    k = {**POLICY_FIELDS[name]["defaults"], **kwargs}
    hd, kv_heads, layers = LLAMA["head_dim"], LLAMA["num_kv_heads"], LLAMA["num_layers"]
    if name == "SnapKV" and isinstance(k["budget"], float):
        if any(round(k["budget"] * n) < 1 for n in set(lengths)):
            return "SnapKV fractional budget keeps no token of a prompt"
    if name == "StreamingLLM":
        if k["budget"] > CONTEXT:
            return "StreamingLLM budget past the context"
        if k["distance_ceiling"] is not None and k["distance_ceiling"] >= CONTEXT:
            return "StreamingLLM distance_ceiling past the context"
    if name in ("KIVI", "GEAR"):
        if not _channel_groups_ok(k["bits"], k["group_size"], hd) or k["group_size"] > CONTEXT:
            return f"{name} group_size does not fit"
        if name == "KIVI" and k["residual"] > CONTEXT:
            return "KIVI residual past the context"
    if name == "MixedPrecisionKV":
        if (
            not all(_channel_groups_ok(b, k["group_size"], hd) for b in (k["high_bits"], k["low_bits"]))
            or k["group_size"] > CONTEXT
        ):
            return "MixedPrecisionKV group_size does not fit"
        if isinstance(k["important"], float) and round(k["important"] * padded) < 1:
            return UNKNOWN  # a fraction of the padded prompt keeping no token: refusing it is fine too
    if name == "RotateKV":
        width = k["head_group"] * hd
        if kv_heads % k["head_group"] or width & (width - 1):
            return "RotateKV head_group does not fit"
        if not _channel_groups_ok(k["bits"], k["group_size"], width) or not _channel_groups_ok(
            k["bits"], k["group_size"], hd
        ):
            return "RotateKV group_size does not fit"
    if name == "MiniCache":
        start = layers // 2 if k["start_layer"] is None else k["start_layer"]
        if start > layers:
            return "MiniCache start_layer past the layers"
    if name == "XKV" and k["group_size"] > layers:
        return "XKV group_size past the layers"
    return None


def policy_unbounded(name: str, kwargs: dict) -> bool:
    k = {**POLICY_FIELDS[name]["defaults"], **kwargs}
    return name == "StreamingLLM" and (k["positions"] == "cache" or k["distance_ceiling"] is not None)


# ---------------------------------------------------------------------------------------------- drafters

DRAFTER_FIELDS = {
    "PromptLookup": dict(num_tokens=3, max_ngram=3, min_ngram=1),
    "TokenRecycling": dict(candidates=8, template=None, adjacency=None),
    "DraftModel": dict(num_tokens=4),
    "RSD": dict(branching=(3, 2, 2, 1)),
    "DySpec": dict(tree_size=16, max_depth=6, per_step=4),
}
DEFAULT_TR_TEMPLATE = ((0, 0), (0, 1), (1, 0), (2, 0), (3, 0))  # bfs_template(((2,), (1, 1), (1,)))


def template_problem(template, candidates):
    try:
        pairs = [tuple(p) for p in template]
    except TypeError:
        return "template not a sequence of pairs"
    if isinstance(template, (str, bytes)) or any(len(p) != 2 or not (is_int(p[0]) and is_int(p[1])) for p in pairs):
        return "template not (parent, rank) int pairs"
    if not pairs or len(pairs) > MAX_TREE_NODES - 1:
        return "template size"
    for node, (parent, rank) in enumerate(pairs, start=1):
        if not 0 <= parent < node or not 0 <= rank < candidates:
            return "template parent/rank out of range"
    if len(set(pairs)) != len(pairs):
        return "template repeats a pair"
    return None


def drafter_tree_size(name: str, kwargs: dict) -> int:
    k = {**DRAFTER_FIELDS[name], **kwargs}
    if name in ("PromptLookup", "DraftModel"):
        return int(k["num_tokens"]) + 1
    if name == "TokenRecycling":
        return len(DEFAULT_TR_TEMPLATE if k["template"] is None else tuple(k["template"])) + 1
    if name == "RSD":
        size = level = 1
        for b in k["branching"]:
            level *= int(b)
            size += level
        return size
    return int(k["tree_size"])


def drafter_ctor_problem(name: str, kwargs: dict, draft_vocab: int | None, draft_kind: str | None):
    """Construction of a drafter (draft_vocab / draft_kind: the draft model's, for model drafters)."""
    allowed = set(DRAFTER_FIELDS[name])
    unknown = set(kwargs) - allowed
    if unknown:
        return f"{name}: unknown parameter(s) {sorted(unknown)}"
    k = {**DRAFTER_FIELDS[name], **kwargs}
    if name in ("DraftModel", "RSD", "DySpec") and draft_kind in ("config_dict", "quamba"):
        return f"{name}: draft config is not a float model config"
    if name == "PromptLookup":
        if not int_in(k["num_tokens"], 1, MAX_TREE_NODES - 1):
            return "PromptLookup num_tokens"
        if (
            not int_in(k["max_ngram"], 1, MAX_NGRAM)
            or not int_in(k["min_ngram"], 1, MAX_NGRAM)
            or k["max_ngram"] < k["min_ngram"]
        ):
            return "PromptLookup n-gram sizes"
    elif name == "TokenRecycling":
        if not int_in(k["candidates"], 1):
            return "TokenRecycling candidates"
        template = DEFAULT_TR_TEMPLATE if k["template"] is None else k["template"]
        problem = template_problem(template, k["candidates"])
        if problem:
            return "TokenRecycling " + problem
    elif name == "DraftModel":
        if not int_in(k["num_tokens"], 1, MAX_TREE_NODES - 1):
            return "DraftModel num_tokens"
    elif name == "RSD":
        b = k["branching"]
        if not isinstance(b, (tuple, list)) or not b or not all(int_in(x, 1) for x in b):
            return "RSD branching"
        if drafter_tree_size(name, kwargs) > MAX_TREE_NODES:
            return "RSD tree too large"
        if max(b) > draft_vocab:
            return "RSD branching wider than the vocabulary"
    elif name == "DySpec":
        if (
            not int_in(k["tree_size"], 2, MAX_TREE_NODES)
            or not int_in(k["max_depth"], 1, MAX_TREE_NODES - 1)
            or not int_in(k["per_step"], 1, MAX_TREE_NODES - 1)
        ):
            return "DySpec sizes"
        if k["tree_size"] - 1 > draft_vocab:
            return "DySpec tree_size past the vocabulary"
    return None


def drafter_model_problem(name: str, kwargs: dict, draft_vocab: int | None):
    k = {**DRAFTER_FIELDS[name], **kwargs}
    if name == "TokenRecycling" and k["candidates"] > VOCAB:
        return "TokenRecycling candidates past the vocabulary"
    if name in ("DraftModel", "RSD", "DySpec") and draft_vocab != VOCAB:
        return "draft vocabulary differs from the target's"
    return None


# ================================================================================ hypothesis strategies
# Run in the parent. Payloads are plain picklable data; the worker builds objects from them.


def strategies():
    from hypothesis import strategies as st

    nan, inf = float("nan"), float("inf")
    wild = [
        None,
        True,
        False,
        np.bool_(True),
        0,
        1,
        -1,
        2,
        7,
        10**9,
        2**31,
        2**32,
        2**63,
        2**70,
        -(2**40),
        np.int8(3),
        np.int64(5),
        np.uint64(2**63),
        np.int32(-2),
        0.0,
        0.5,
        1.0,
        -0.5,
        1e-9,
        1e300,
        nan,
        inf,
        -inf,
        2.0,
        np.float32(0.5),
        np.float64(0.25),
        np.float16(1.0),
        Fraction(1, 3),
        "1",
        "abc",
        "",
        "0.5",
        "nan",
        b"1",
        [1],
        [1, 2],
        (),
        [[1]],
        {},
        {"a": 1},
        1j,
        Special("object"),
    ]

    def pool(valid, invalid=(), wild_weight=True):
        options = [st.sampled_from(list(valid))]
        if invalid:
            options.append(st.sampled_from(list(invalid)))
        if wild_weight:
            options.append(st.sampled_from(wild))
        return st.one_of(*options)

    # --------------------------------------------------------------------------------- generate options
    # VALID values come from small sets so that the compiled shapes stay few.
    option_values = {
        "max_new_tokens": ([1, 2, 5, 8, np.int64(5), np.int32(2)], [0, -1, True, 5.0, "5", MAX_NEW_TOKENS + 1, 10**9]),
        "temperature": (
            [0, 0.0, 0.0, 0.7, 1.0, 1.5, np.float32(0.5), 1, Fraction(1, 2)],
            [-0.1, nan, inf, "0.5", True],
        ),
        "top_k": ([None, 0, 1, 3, VOCAB, 10**6, np.int64(3)], [-1, True, 2.5, "3", np.float64(3.0)]),
        "top_p": ([1.0, 0.9, 0.5, 1, 1e-3, np.float64(0.8)], [0, 0.0, -0.5, 1.01, nan, "0.9", False]),
        "min_p": ([0.0, 0.05, 0.5, 0, 0.999], [1, 1.0, -0.01, nan, "0", True]),
        "seed": ([0, 1, 2**32 - 1, np.uint32(7), 123456], [-1, 2**32, 2**70, "abc", 1.5, np.int64(-5)]),
        "eos_token_ids": (
            [None, (), [], (2,), 2, [5, 7], np.array([5, 7]), (np.int64(3),), {4, 9}],
            ["2", b"2", -1, [1, -1], [VOCAB], VOCAB, [[2]], 2.0, [2.5], True, [True], 10**30],
        ),
        "max_len": ([None, None, 64, 100], [0, -5, True, 1.5, "64", 10**11]),
    }

    @st.composite
    def gen_kwargs(draw, fields=tuple(option_values), plain=False):
        kwargs = {}
        for name in fields:
            if draw(st.integers(0, 3)) == 0:  # a quarter of the fields set
                valid, invalid = option_values[name]
                roll = 0 if plain else draw(st.integers(0, 19))
                pool_ = valid if roll < 16 else (invalid if roll < 19 else wild)
                kwargs[name] = draw(st.sampled_from(pool_))
        if not plain and draw(st.integers(0, 30)) == 0:
            kwargs[draw(st.sampled_from(["max_tokens", "temp", "eos"]))] = 1
        return kwargs

    @st.composite
    def prompts(draw, long_ok=True, plain=False):
        kind = 0 if plain else draw(st.integers(0, 9))
        if kind < 7:  # valid shapes
            batch = draw(st.integers(1, 3))
            lengths = [draw(st.sampled_from([1, 2, 3, 5, 9, 16])) for _ in range(batch)]
            rows = [[draw(st.integers(0, VOCAB - 1)) for _ in range(n)] for n in lengths]
            form = draw(st.sampled_from(["lists", "lists", "tuples", "arrays", "matrix", "np_items", "uint8"]))
            if form == "tuples":
                return tuple(tuple(r) for r in rows)
            if form == "arrays":
                return [np.asarray(r, dtype=draw(st.sampled_from([np.int32, np.int64, np.int16]))) for r in rows]
            if form == "matrix" and len(set(lengths)) == 1:
                return np.asarray(rows, np.int64)
            if form == "np_items":
                return [[np.int64(v) for v in r] for r in rows]
            if form == "uint8":
                return [np.asarray(r, np.uint8) for r in rows]
            return rows
        if kind == 7 and long_ok:  # a long prompt: past the Llama's context, fine for state-space models
            return [[draw(st.integers(0, VOCAB - 1))] * draw(st.sampled_from([CONTEXT, CONTEXT + 1, 200]))]
        bad = [
            [],
            (),
            np.zeros((0,), np.int64),
            "w3 w4",
            b"ab",
            5,
            [5, 6],
            [[]],
            [[1, 2], []],
            [[1, [2, 3]]],
            [[1.0, 2.0]],
            [[1, 2.5]],
            [["a"]],
            [[None]],
            [[True, False]],
            [[1, True]],
            [[-1]],
            [[VOCAB]],
            [[10**20]],
            [[2**32 + 5]],
            [[2**64 + 3]],
            np.asarray([[1, 2]], float),
            np.asarray([[1, 2]], bool),
            {"a": [1]},
            None,
            [np.asarray([[1, 2]])],
            [np.int64(3)],
            [[np.float32(1)]],
            [np.asarray([1, 2], np.uint64)],
            [[1, 2], "w3"],
            [np.asarray([2**32 + 5], np.int64)],
            [[Fraction(2, 1)]],
        ]
        return draw(st.sampled_from(bad))

    misuse = st.sampled_from(
        [None] * 50
        + [
            "config_dict",
            "other_family_params",
            "gen_config_dict",
            "params_none",
            "params_wrong_shape",
            "params_int_dtype",
            "params_unstacked",
            "config_str",
            "params_missing_key",
        ]
    )
    on_token = st.sampled_from([None] * 12 + ["record", "record", "raise_at_0", "raise_at_2", "not_callable"])

    generate_options = st.fixed_dictionaries(
        {
            "model": st.sampled_from(["llama", "llama", "mamba", "mamba2"]),
            "gen": gen_kwargs(),
            "prompts": prompts(),
            "misuse": misuse,
            "on_token": on_token,
        }
    )

    # --------------------------------------------------------------------------------------- KV policies
    policy_values = {
        "SnapKV": {
            "budget": ([4, 8, 16, 0.5, 0.25, 1.0, np.int64(8), 10**9], [0, -1, 0.0, 1.5, nan, "8", True, 1e-9]),
            "window": ([1, 2, 4, 32], [0, -1, 2.5, "4", True]),
            "kernel_size": ([1, 3, 5, 7], [0, 2, 4, 1.0]),
            "pooling": (["max", "avg"], ["mean", "", "MAX"]),
            "pyramid": ([True, False, np.bool_(True)], [1, "yes"]),
            "beta": ([20.0, 1, 100, np.float32(5)], [0.5, 0, nan, inf, "20"]),
        },
        "StreamingLLM": {
            "budget": ([8, 16, 32, 64, CONTEXT], [0, -1, 0.5, "16", True, 10**9, CONTEXT + 1]),
            "sinks": ([0, 1, 4], [-1, 1.5, True, 100]),
            "positions": (["cache", "original"], ["abs", ""]),
            "distance_ceiling": ([None, 16, 64, CONTEXT - 1], [0, -1, 2.5, CONTEXT, 10**6]),
        },
        "KIVI": {
            "bits": ([2, 4, 8, 16], [1, 3, 0, 32, 2.0]),
            "group_size": ([4, 8, 16, 32, 12], [0, 3, 6, 2.5]),
            "residual": ([8, 16, 32, 64, 128, 24], [0, 5, 256, 10**9]),
        },
        "GEAR": {
            "bits": ([2, 4, 8, 16], [3, 2.0]),
            "rank": ([0, 1, 2, 4, 1000], [-1, 1.5]),
            "outlier_fraction": ([0, 0.0, 0.01, 0.5], [1, 1.0, -0.1, nan]),
            "group_size": ([4, 8, 16, 32], [0, 3, 6, 200]),
        },
        "MiniCache": {
            "start_layer": ([None, 0, 1, 2], [-1, 3, 1.5]),
            "t": ([0, 0.6, 1, 1.0], [-0.1, 1.5, nan]),
            "retention_threshold": ([0.0, 0.05, 1.0], [2, nan]),
            "max_retained": ([0.1, 0.0, 1.0, 0, 5, 100], [-1, 1.5, nan]),
        },
        "MixedPrecisionKV": {
            "high_bits": ([8, 4, 16, 2], [3, 1]),
            "low_bits": ([2, 4, 8, 16], [0, 5]),
            "important": ([0.2, 0.5, 1.0, 1, 4, 0.01], [0, 0.0, 1.5, -1]),
            "window": ([1, 4, 32], [0, -2]),
            "group_size": ([4, 8, 32], [0, 3, 200]),
        },
        "RotateKV": {
            "bits": ([2, 4, 8, 16], [3]),
            "group_size": ([4, 8, 16, 128], [0, 3, 6]),
            "sinks": ([0, 1, 4, 64], [-1, 2.0]),
            "head_group": ([1, 2], [0, 4, 3]),
        },
        "TokenSelect": {
            "k": ([1, 4, 16, 1000], [0, -1, 2.5]),
            "sinks": ([0, 2, 128], [-1]),
            "local": ([0, 4, 512], [-1]),
            "threshold": ([None, 0.9, -1, 1, 0], [1.5, nan, -2]),
        },
        "XKV": {
            "rank": ([1, 2, 4, 100], [0, -1, 1.5]),
            "group_size": ([1, 2], [0, 3, 100]),
            "value_rank": ([None, 1, 3], [0, -1]),
        },
    }

    @st.composite
    def policy(draw, plain=False):
        name = draw(st.sampled_from(sorted(policy_values)))
        kwargs = {}
        for field, (valid, invalid) in policy_values[name].items():
            required = field in POLICY_FIELDS[name]["required"]
            if required or draw(st.integers(0, 2)) == 0:
                roll = 0 if plain else draw(st.integers(0, 11))
                if required and roll == 11:
                    continue  # the required parameter left out
                kwargs[field] = draw(st.sampled_from(valid if roll < 8 else (invalid if roll < 10 else wild)))
        if not plain and draw(st.integers(0, 30)) == 0:
            kwargs["bogus"] = 1
        return {"cls": name, "kwargs": kwargs}

    kv_fields = ("max_new_tokens", "temperature", "eos_token_ids", "max_len", "seed")

    @st.composite
    def generate_kv(draw):
        plain = draw(st.booleans())  # half plausible (valid option values), half anything goes
        wrong = st.sampled_from([Special("drafter"), "snapkv", 5, True])
        return {
            "model": draw(st.sampled_from(["llama"] * (12 if plain else 6) + ["mamba"])),
            "gen": draw(gen_kwargs(fields=kv_fields, plain=plain)),
            "prompts": draw(prompts(long_ok=False, plain=plain)),
            "misuse": None,
            "on_token": draw(st.sampled_from([None] * 6 + ["record"])),
            "policy": draw(policy(plain=True) if plain else st.one_of(policy(), policy(), policy(), wrong)),
        }

    # ------------------------------------------------------------------------------------------ drafters
    templates = [
        None,
        ((0, 0),),
        ((0, 0), (1, 0)),
        ((0, 0), (0, 1), (1, 0)),
        [[0, 0], [1, 0], [2, 0]],
        Special("wide_template"),
    ]
    bad_templates = [
        (),
        ((0, 1),),
        ((1, 0),),
        ((0, 0), (0, 0)),
        ((0,),),
        "ab",
        ((0.0, 0),),
        ((True, 0),),
        Special("huge_template"),
        ((0, -1),),
        5,
        None,
    ]
    drafter_values = {
        "PromptLookup": {
            "num_tokens": ([1, 2, 3, 5, np.int64(2)], [0, -1, MAX_TREE_NODES, 10**6, 2.5, True]),
            "max_ngram": ([1, 2, 3, MAX_NGRAM], [0, MAX_NGRAM + 1, True]),
            "min_ngram": ([1, 2], [0, -1, 2.0]),
        },
        "TokenRecycling": {
            "candidates": ([1, 2, 8, VOCAB], [0, -1, True, 2.5, VOCAB + 1, 10**6]),
            "template": (templates, bad_templates),
        },
        "DraftModel": {"num_tokens": ([1, 2, 4], [0, MAX_TREE_NODES, True, 2.5])},
        "RSD": {
            "branching": (
                [(2,), (2, 1), (3, 2, 2, 1), [2, 2], (np.int64(2),)],
                [(), (0,), (-1,), (2.5,), "22", (True,), (1000,), (VOCAB + 1,), (32, 32), None, 3],
            )
        },
        "DySpec": {
            "tree_size": ([2, 4, 8], [1, 0, MAX_TREE_NODES + 1, True, 2.5, VOCAB + 2]),
            "max_depth": ([1, 2, 6], [0, MAX_TREE_NODES]),
            "per_step": ([1, 2, 4], [0, -3]),
        },
    }

    @st.composite
    def drafter(draw, plain=False):
        name = draw(
            st.sampled_from(
                ["PromptLookup", "PromptLookup", "TokenRecycling", "TokenRecycling", "DraftModel", "RSD", "DySpec"]
            )
        )
        kwargs = {}
        for field, (valid, invalid) in drafter_values[name].items():
            if draw(st.integers(0, 1)) == 0:
                roll = 0 if plain else draw(st.integers(0, 11))
                kwargs[field] = draw(st.sampled_from(valid if roll < 8 else (invalid if roll < 11 else wild)))
        if not plain and draw(st.integers(0, 30)) == 0:
            kwargs["bogus"] = 1
        draft = None
        if name in ("DraftModel", "RSD", "DySpec"):
            drafts = ["self", "self", "skip", "llama", "mamba", "mamba2"]
            draft = draw(st.sampled_from(drafts if plain else drafts + ["other_vocab", "config_dict"]))
        return {"cls": name, "kwargs": kwargs, "draft": draft}

    spec_fields = ("max_new_tokens", "temperature", "eos_token_ids", "max_len", "top_k", "top_p")

    @st.composite
    def generate_speculative(draw):
        plain = draw(st.booleans())
        wrong = st.sampled_from([Special("policy"), "prompt_lookup", 3])
        return {
            "model": draw(st.sampled_from(["llama", "llama", "mamba", "mamba2"])),
            "gen": draw(gen_kwargs(fields=spec_fields, plain=plain)),
            "prompts": draw(prompts(long_ok=False, plain=plain)),
            "misuse": None,
            "on_token": draw(st.sampled_from([None] * (30 if plain else 10) + ["record"])),
            "drafter": draw(drafter(plain=True) if plain else st.one_of(drafter(), drafter(), drafter(), wrong)),
        }

    # ------------------------------------------------------------------------------------------- forward
    @st.composite
    def forward_payload(draw, jit=False):
        plain = draw(st.booleans())  # half with in-vocabulary ids and well-formed arguments
        model = draw(st.sampled_from(["llama", "llama", "mamba", "mamba2"]))
        batch = draw(st.integers(1, 2))
        steps = draw(st.sampled_from([1, 2, 4]))
        ids = [
            [
                draw(
                    st.one_of(
                        st.integers(0, VOCAB - 1),
                        st.integers(0, VOCAB - 1),
                        st.integers(0, VOCAB - 1),
                        st.sampled_from([-1, VOCAB, VOCAB + 5, 2**31 - 1, -(2**31)]),
                    )
                )
                if not plain or draw(st.integers(0, 15)) == 7
                else draw(st.integers(0, VOCAB - 1))
                for _ in range(steps)
            ]
            for _ in range(batch)
        ]
        if plain:
            token_form = draw(st.sampled_from(["int32", "int64", "list", "uint8"] if not jit else ["int32"]))
        elif jit:
            token_form = draw(st.sampled_from(["int32"] * 6 + ["float32", "bool", "1d", "3d", "empty_steps"]))
        else:
            token_form = draw(
                st.sampled_from(
                    ["int32"] * 4
                    + [
                        "int64",
                        "list",
                        "uint8",
                        "float32",
                        "bool",
                        "1d",
                        "3d",
                        "empty_steps",
                        "ragged",
                        "huge_int64",
                        "object",
                        "string",
                    ]
                )
            )
        counts_form = draw(
            st.sampled_from(
                [None, None, "valid", "valid", "valid"]
                + (["list"] if not jit else [])
                + (
                    []
                    if plain
                    else ["negative", "too_many", "wrong_shape", "float", "bool"]
                    + ([] if jit else ["scalar", "string"])
                )
            )
        )
        counts = [draw(st.integers(0, steps)) for _ in range(batch)]
        cache = draw(
            st.sampled_from(
                ["fresh"] * 3
                + ["prefilled"] * 3
                + ["small", "full"]
                + ([] if plain else ["other_batch", "other_family", "none", "dict"])
            )
        )
        max_len = draw(st.sampled_from([4, 8, 16]))
        prefix = draw(st.sampled_from([1, 3]))
        mode = draw(st.sampled_from(["jit", "jit", "checkify"])) if jit else "eager"
        return {
            "model": model,
            "ids": ids,
            "token_form": token_form,
            "counts_form": counts_form,
            "counts": counts,
            "cache": cache,
            "max_len": max_len,
            "prefix": prefix,
            "mode": mode,
            "misuse": None if plain else draw(st.sampled_from([None] * 10 + ["params_wrong_shape", "config_dict"])),
        }

    # ------------------------------------------------------------------------------------------- loaders
    st_offsets = st.sampled_from(
        ["overlap", "reverse", "negative", "gap", "shift", "huge", "float", "string", "three", "swap_two", "one_short"]
    )

    @st.composite
    def safetensors_mutation(draw):
        ops = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(
                st.sampled_from(
                    [
                        "offsets",
                        "shape",
                        "dtype",
                        "header_size",
                        "flip_header",
                        "flip_data",
                        "truncate",
                        "append",
                        "duplicate_key",
                        "metadata",
                        "drop_tensor",
                        "rename_tensor",
                        "header_not_object",
                        "reorder",
                        "pad_header",
                        "noop",
                    ]
                )
            )
            op = {
                "kind": kind,
                "tensor": draw(st.integers(0, 1000)),
                "pos": draw(st.integers(0, 10**6)),
                "byte": draw(st.integers(1, 255)),
            }
            if kind == "offsets":
                op["how"] = draw(st_offsets)
            elif kind == "shape":
                op["shape"] = draw(
                    st.sampled_from(
                        [
                            "transpose",
                            "drop_dim",
                            "add_one",
                            "zero",
                            "negative",
                            "float",
                            "huge",
                            "string",
                            "double_first",
                        ]
                    )
                )
            elif kind == "dtype":
                op["dtype"] = draw(
                    st.sampled_from(["F16", "BF16", "I32", "I64", "F64", "U8", "BOOL", "F8_E4M3", "X32", "", 32, None])
                )
            elif kind == "header_size":
                op["size"] = draw(st.sampled_from(["zero", "huge", "minus_one", "plus_one", "2**63", "file_size"]))
            elif kind == "metadata":
                op["metadata"] = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [1], "x", {"a": None}, {}]))
            ops.append(op)
        return {"ops": ops}

    json_values = [
        None,
        0,
        -1,
        1,
        2,
        3,
        7,
        8,
        16,
        64,
        2**31,
        2**70,
        1.5,
        32.0,
        8.0,
        0.0,
        -0.5,
        1e-6,
        "32",
        "8",
        "llama",
        "silu",
        "",
        True,
        False,
        [32],
        [1, 2],
        {},
        {"rope_theta": 10000.0},
        "false",
        [2, -1],
    ]
    config_keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "hidden_act",
        "model_type",
        "architectures",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "partial_rotary_factor",
    ]

    benign_config_ops = [
        {"kind": "set", "key": "max_position_embeddings", "value": 64},
        {"kind": "set", "key": "max_position_embeddings", "value": 4096},
        {"kind": "remove", "key": "max_position_embeddings", "value": None},
        {"kind": "set", "key": "rms_norm_eps", "value": 1e-5},
        {"kind": "set", "key": "rms_norm_eps", "value": 1},
        {"kind": "set", "key": "eos_token_id", "value": [2, 5]},
        {"kind": "set", "key": "eos_token_id", "value": 7},
        {"kind": "set", "key": "eos_token_id", "value": None},
        {"kind": "set", "key": "eos_token_id", "value": []},
        {"kind": "set", "key": "bos_token_id", "value": 0},
        {"kind": "remove", "key": "bos_token_id", "value": None},
        {"kind": "remove", "key": "head_dim", "value": None},
        {"kind": "remove", "key": "model_type", "value": None},
        {"kind": "set", "key": "rope_parameters", "value": {"rope_theta": 500000.0, "rope_type": "default"}},
        {"kind": "set", "key": "rope_parameters", "value": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}},
        {"kind": "remove", "key": "rope_parameters", "value": None},
        {"kind": "set", "key": "rope_theta", "value": 20000.0},
        {"kind": "set", "key": "tie_word_embeddings", "value": False},
        {"kind": "set", "key": "hidden_act", "value": None},
        {"kind": "set", "key": "num_key_value_heads", "value": 2},
        {"kind": "set", "key": "transformers_version", "value": "99.0"},
        {"kind": "set", "key": "use_cache", "value": "x"},
        {"kind": "set", "key": "attention_bias", "value": 0},
        {"kind": "set", "key": "mlp_bias", "value": None},
    ]

    @st.composite
    def config_mutation(draw):
        whole = draw(st.sampled_from([None] * 40 + ["list", "string", "number", "null", "invalid_json", "empty"]))
        ops = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.integers(0, 1)) == 0:  # a change a correct loader must follow (or a key it may default)
                ops.append(draw(st.sampled_from(benign_config_ops)))
                continue
            key = draw(st.sampled_from(config_keys))
            kind = draw(st.sampled_from(["remove", "set", "set", "set"]))
            value = None
            if kind == "set":
                if key == "model_type":
                    value = draw(st.sampled_from(["gpt_neox", "mamba", "qwen2", "mistral", "LLAMA", "", None, 5]))
                elif key == "architectures":
                    value = draw(st.sampled_from([["GPTNeoXForCausalLM"], ["MambaForCausalLM"], [], "Llama", None]))
                elif key == "rope_parameters":
                    value = draw(
                        st.sampled_from(
                            [
                                {"rope_theta": 500000.0, "rope_type": "default"},
                                {"rope_theta": -1.0},
                                {"rope_type": "yarn", "factor": 2.0},
                                {"rope_type": "linear", "factor": 2.0},
                                {"rope_type": "linear"},
                                {"rope_theta": "10000"},
                                [],
                                "x",
                                None,
                            ]
                        )
                    )
                else:
                    value = draw(st.sampled_from(json_values))
            ops.append({"kind": kind, "key": key, "value": value})
        return {"whole": whole, "ops": ops}

    shard_names = [
        "../outside/canary.safetensors",
        "/ABS/outside/canary.safetensors",
        "sub/../../outside/canary.safetensors",
        "..\\outside\\canary.safetensors",
        "model.safetensors",
        "shards/model.safetensors",
        "missing.safetensors",
        "",
        None,
        5,
        "./model.safetensors",
        "model.safetensors\u0000x",
        "C:/outside/canary.safetensors",
        "shards/../model.safetensors",
    ]
    shard_index = st.fixed_dictionaries(
        {
            "entries": st.lists(st.sampled_from(shard_names), min_size=1, max_size=3),
            "layout": st.sampled_from(
                ["all_to_first", "split", "split", "not_object", "no_weight_map", "weight_map_list"]
            ),
            "inside_copy": st.sampled_from([None, "model.safetensors", "shards/model.safetensors"]),
            "keep_single": st.sampled_from([False, False, False, True]),
        }
    )

    pickle_payload = st.fixed_dictionaries(
        {
            "form": st.sampled_from(
                [
                    "torch_top",
                    "torch_nested",
                    "torch_value",
                    "raw_pickle",
                    "legacy_torch",
                    "valid",
                    "valid",
                    "state_not_dict",
                    "non_tensor_value",
                    "truncated_valid",
                    "garbage",
                ]
            ),
            "callable": st.sampled_from(["open", "mkdir", "exec"]),
        }
    )

    gguf_keys = [
        "general.architecture",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "llama.attention.key_length",
        "llama.rope.dimension_count",
        "llama.rope.scaling.type",
        "llama.rope.scaling.factor",
    ]
    gguf_values = [
        ("u32", 0),
        ("u32", 1),
        ("u32", 2),
        ("u32", 4),
        ("u32", 8),
        ("u32", 16),
        ("u32", 32),
        ("u32", 64),
        ("u32", 2**31),
        ("i32", -1),
        ("i32", 2),
        ("u64", 2**40),
        ("f32", 2.0),
        ("f32", 1e-6),
        ("f32", -1.0),
        ("f32", float("nan")),
        ("f64", 10000.0),
        ("bool", True),
        ("str", "32"),
        ("str", "llama"),
        ("str", "qwen2"),
        ("str", "gpt2"),
        ("str", "linear"),
        ("str", "yarn"),
        ("arr_u32", [2]),
        ("arr_u32", [2, 3]),
        ("arr_str", ["a"]),
        ("u8", 3),
        ("i64", -5),
    ]

    @st.composite
    def gguf_mutation(draw):
        ops = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(
                st.sampled_from(
                    [
                        "meta_set",
                        "meta_set",
                        "meta_remove",
                        "tensor_drop",
                        "tensor_shape",
                        "tensor_dtype",
                        "tensor_extra",
                        "tensor_rename",
                        "flip",
                        "truncate",
                        "noop",
                        "drop_output",
                    ]
                )
            )
            op = {
                "kind": kind,
                "key": draw(st.sampled_from(gguf_keys)),
                "value": draw(st.sampled_from(gguf_values)),
                "tensor": draw(st.integers(0, 1000)),
                "pos": draw(st.integers(0, 10**6)),
                "byte": draw(st.integers(1, 255)),
                "how": draw(
                    st.sampled_from(
                        [
                            "transpose",
                            "rows_minus_one",
                            "extra_dim",
                            "F16",
                            "Q8_0",
                            "BF16",
                            "rope_freqs.weight",
                            "blk.9.attn_q.weight",
                            "unknown.weight",
                        ]
                    )
                ),
            }
            ops.append(op)
        return {"ops": ops}

    orbax_keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "qkv_bias",
        "layer_windows",
        "bos_token_id",
        "eos_token_ids",
        "model_type",
        "family",
        "rope",
        "unknown_key",
        "state_size",
        "conv_kernel",
        "n_groups",
        "chunk_size",
        "time_step_limit",
    ]

    @st.composite
    def orbax_mutation(draw):
        ops = []
        for _ in range(draw(st.integers(1, 2))):
            kind = draw(
                st.sampled_from(
                    [
                        "config_set",
                        "config_set",
                        "config_remove",
                        "meta",
                        "file_delete",
                        "file_flip",
                        "file_truncate",
                        "file_garbage",
                        "noop",
                        "whole_config",
                    ]
                )
            )
            ops.append(
                {
                    "kind": kind,
                    "key": draw(st.sampled_from(orbax_keys)),
                    "value": draw(
                        st.sampled_from(
                            json_values
                            + [[0, 0], [4, 4], [5], {"theta": 5.0}, {"theta": -1.0}, "mamba2", "mamba", "quamba"]
                        )
                    ),
                    "file": draw(st.integers(0, 10**4)),
                    "pos": draw(st.integers(0, 10**6)),
                    "byte": draw(st.integers(1, 255)),
                    "meta": draw(
                        st.sampled_from(
                            ["version_2", "version_str", "no_config", "config_list", "quantized_bogus", "list"]
                        )
                    ),
                }
            )
        return {"model": draw(st.sampled_from(["llama", "llama", "mamba2"])), "ops": ops}

    # ----------------------------------------------------------------------------------------- text specs
    literals = [
        "8",
        "0.5",
        "-1",
        "0",
        "1",
        "2",
        "4",
        "16",
        "1e9",
        "nan",
        "inf",
        "'max'",
        "max",
        "avg",
        "True",
        "None",
        "false",
        "(1, 2)",
        "[(0, 0)]",
        "((0, 0), (1, 0))",
        "1_000",
        "0x10",
        "((",
        ")",
        "[1, 2",
        "'a,b'",
        '"',
        "1e400",
        "10**9",
        "__import__('os').getcwd()",
        "9" * 5000,
        "(" * 300 + ")" * 300,
        "cache",
        "original",
        "0.25",
        "1.0",
        "3",
        "(2, 1)",
        "[2, 2]",
        " 8 ",
        "8 8",
        "{}",
        "[]",
        "b'x'",
        "1j",
        "-0.0",
        "2.0",
    ]
    policy_names = [
        "snapkv",
        "SnapKV",
        " streamingllm ",
        "kivi",
        "GEAR",
        "minicache",
        "mixedprecisionkv",
        "rotatekv",
        "tokenselect",
        "xkv",
        "snap",
        "",
        "pyramidkv",
        "snapkv2",
        "prompt_lookup",
    ]
    drafter_names = [
        "prompt_lookup",
        "token_recycling",
        "Prompt_Lookup",
        " TOKEN_RECYCLING",
        "dyspec",
        "draftmodel",
        "rsd",
        "",
        "promptlookup",
        "snapkv",
    ]
    policy_keys = sorted({k for spec in POLICY_FIELDS.values() for k in (*spec["required"], *spec["defaults"])})
    drafter_keys = ["num_tokens", "max_ngram", "min_ngram", "candidates", "template", "adjacency"]

    clean_values = {
        "budget": ["8", "16", "0.5", "64"],
        "window": ["1", "4"],
        "kernel_size": ["3", "5"],
        "pooling": ["max", "'avg'"],
        "pyramid": ["True", "False"],
        "beta": ["20", "2.5"],
        "sinks": ["0", "4"],
        "positions": ["cache", "original"],
        "distance_ceiling": ["None", "64"],
        "bits": ["2", "4", "8", "16"],
        "group_size": ["4", "8", "32"],
        "residual": ["32", "64"],
        "rank": ["1", "4"],
        "outlier_fraction": ["0.01", "0"],
        "start_layer": ["None", "0", "1"],
        "t": ["0.6", "1"],
        "retention_threshold": ["0.05"],
        "max_retained": ["0.1", "4"],
        "high_bits": ["8", "16"],
        "low_bits": ["2", "4"],
        "important": ["0.2", "4"],
        "head_group": ["1", "2"],
        "k": ["4", "16"],
        "local": ["0", "8"],
        "threshold": ["0.9", "None"],
        "value_rank": ["None", "2"],
        "num_tokens": ["1", "3", "8"],
        "max_ngram": ["3", "4"],
        "min_ngram": ["1", "2"],
        "candidates": ["2", "8"],
        "template": ["((0, 0),)", "[(0, 0), (1, 0)]", "((0,0),(0,1))"],
    }
    clean_names = {
        "snapkv": ["budget", "window", "kernel_size", "pooling", "pyramid", "beta"],
        "streamingllm": ["budget", "sinks", "positions", "distance_ceiling"],
        "kivi": ["bits", "group_size", "residual"],
        "gear": ["bits", "rank", "outlier_fraction", "group_size"],
        "minicache": ["start_layer", "t", "retention_threshold", "max_retained"],
        "mixedprecisionkv": ["high_bits", "low_bits", "important", "window", "group_size"],
        "rotatekv": ["bits", "group_size", "sinks", "head_group"],
        "tokenselect": ["k", "sinks", "local", "threshold"],
        "xkv": ["rank", "group_size", "value_rank"],
        "prompt_lookup": ["num_tokens", "max_ngram", "min_ngram"],
        "token_recycling": ["candidates", "template"],
    }

    @st.composite
    def spec_text(draw, names, keys, clean_only=False):
        clean = [n for n in clean_names if n in [x.strip().lower() for x in names]]
        if (
            clean_only or draw(st.integers(0, 1)) == 0
        ):  # plausible: a known name and a few of its own keys, right-typed values
            name = draw(st.sampled_from(clean))
            fields = draw(st.lists(st.sampled_from(clean_names[name]), unique=True, max_size=3))
            required = {"snapkv": "budget", "streamingllm": "budget", "tokenselect": "k", "xkv": "rank"}.get(name)
            if required and required not in fields and draw(st.integers(0, 5)):
                fields.append(required)
            items = [f"{k}={draw(st.sampled_from(clean_values[k]))}" for k in fields]
            return name + (":" + ",".join(items) if items else "")
        text = draw(st.sampled_from(names))
        if draw(st.integers(0, 4)) == 0:
            return text
        items = []
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.sampled_from(keys + ["", "bogus", " window", "budget "]))
            sep = draw(st.sampled_from(["=", "=", "=", "", "==", " = "]))
            items.append(f"{key}{sep}{draw(st.sampled_from(literals))}")
        joiner = draw(st.sampled_from([",", ",", ", ", ";", ",,"]))
        colon = draw(st.sampled_from([":", ":", "::", " : "]))
        return text + colon + joiner.join(items)

    spec_policy = st.fixed_dictionaries({"text": spec_text(policy_names, policy_keys)})
    spec_drafter = st.fixed_dictionaries({"text": spec_text(drafter_names, drafter_keys)})

    # ------------------------------------------------------------------------------------------------ CLI
    int_strings = ["1", "2", "4", "0", "-1", "1e3", "5.0", "", "abc", "0x10", " 3 ", "99999999999", "1000000", "\u0663"]
    float_strings = [
        "0",
        "0.0",
        "0.7",
        "1",
        "1.5",
        "-0.5",
        "nan",
        "inf",
        "-inf",
        "1e400",
        "abc",
        "",
        "0.9",
        "1_0",
        "infinity",
        "1e-3",
        "2",
    ]

    @st.composite
    def cli_argv(draw):
        plain = draw(st.booleans())  # half the argv lists are plausible and mostly valid, half anything goes
        commands = (
            ["generate"] * 2 + ["convert"] if plain else ["generate"] * 6 + ["convert"] * 3 + ["", "bogus", "--help"]
        )
        command = draw(st.sampled_from(commands))
        opts = []

        def pick(good, bad):
            return draw(st.sampled_from(good if plain else good + bad))

        if command == "generate":
            if plain or draw(st.integers(0, 9)):
                opts.append(
                    (
                        "--prompt",
                        pick(
                            ["w3 w4 w5", "w7", "hello world", "w3\nw4", "w5 " * 20],
                            ["", "w9 " * 150, "-w3", "\u00e9\u6f22"],
                        ),
                    )
                )
            opts.append(
                (
                    "--model",
                    pick(
                        ["cli_ckpt"] * 4 + ["hf_dir"], ["missing", "not_gguf", "ckpt_no_tokenizer", "gguf", "empty_dir"]
                    ),
                )
            )
            for flag, good, bad in (
                ("--max-new-tokens", ["1", "2", "4", " 3 "], int_strings),
                ("--temperature", ["0", "0.7", "1", "1_0"], float_strings),
                ("--top-k", ["0", "1", "4", "\u0663"], int_strings),
                ("--top-p", ["0.9", "1", "1e-3"], float_strings),
                ("--min-p", ["0", "0.05"], float_strings),
                ("--seed", ["0", "7", "4294967295"], int_strings),
            ):
                if draw(st.integers(0, 3)) == 0:
                    opts.append((flag, pick(good, bad)))
            if plain or draw(st.integers(0, 3)) == 0:
                opts.append(("--max-new-tokens", draw(st.sampled_from(["1", "2", "3"]))))
            for flag in ("--chat", "--no-stream"):
                if draw(st.integers(0, 3)) == 0:
                    opts.append((flag, None))
            if draw(st.integers(0, 5)) == 0 and (not plain or ("--chat", None) in opts):
                opts.append(("--system", pick(["w5 w6"], [""])))
            if draw(st.integers(0, 4)) == 0:
                opts.append(("--kv-compression", draw(spec_text(policy_names, policy_keys, clean_only=plain))))
            elif draw(st.integers(0, 4)) == 0 or (not plain and draw(st.integers(0, 4)) == 0):
                opts.append(("--speculative", draw(spec_text(drafter_names, drafter_keys, clean_only=plain))))
        elif command == "convert":
            opts.append(("SOURCE", pick(["hf_dir", "hf_dir", "gguf", "ckpt"], ["missing", "not_gguf"])))
            opts.append(
                (
                    "DEST",
                    pick(
                        ["new", "new", "empty", "nested_new", "checkpoint"],
                        ["unrelated", "source", "inside_source", "contains_source", "file"],
                    ),
                )
            )
            if draw(st.integers(0, 2)) == 0 or (plain and ("DEST", "checkpoint") in opts):
                opts.append(("--overwrite", None))
            if draw(st.integers(0, 3)) == 0:
                opts.append(("--dtype", pick(["float32", "bfloat16", "float16"], ["int8", ""])))
        if not plain and draw(st.integers(0, 15)) == 0:
            opts.append(("--bogus-flag", None))
        form = draw(st.sampled_from(["separate", "separate", "equals"]))
        return {"command": command, "opts": opts, "form": form}

    cli = st.fixed_dictionaries({"argv": cli_argv()})

    return {
        "generate_options": generate_options,
        "generate_kv": generate_kv(),
        "generate_speculative": generate_speculative(),
        "forward": forward_payload(),
        "forward_jit": forward_payload(jit=True),
        "load_safetensors": safetensors_mutation(),
        "load_config_json": config_mutation(),
        "load_shard_index": shard_index,
        "load_pickle": pickle_payload,
        "load_gguf": gguf_mutation(),
        "load_orbax": orbax_mutation(),
        "spec_policy": spec_policy,
        "spec_drafter": spec_drafter,
        "cli": cli,
    }


# ============================================================================================== verdicts


class Verdict(Exception):
    """The outcome of an example, raised from anywhere inside a runner."""

    def __init__(self, outcome: str, detail: str = "", exc: BaseException | None = None):
        super().__init__(outcome, detail)
        self.outcome, self.detail, self.exc = outcome, detail, exc


def raising_frame(exc: BaseException) -> tuple[str, str, int]:
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return "?", "?", 0
    code = last.tb_frame.f_code
    return code.co_filename, code.co_name, last.tb_lineno


def is_own_file(filename: str) -> bool:
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return any(REPO / package in path.parents for package in OWN_PACKAGES)


_BINDING = re.compile(r"\(\) (got an unexpected keyword argument|missing \d+ required|takes \d+ positional)")


def classify_refusal(exc: BaseException) -> tuple[str, str]:
    """(outcome, note) for an exception raised on an input the oracle calls invalid (or undecided)."""
    if not isinstance(exc, EXPECTED_ERRORS):
        return "crash", f"unexpected exception type {type(exc).__name__}"
    filename, func, line = raising_frame(exc)
    message = str(exc).strip()
    own = is_own_file(filename)
    if not own and filename == THIS_FILE and isinstance(exc, TypeError) and _BINDING.search(message):
        own = True  # Python's argument binding of a library callable: the message names the argument
    if not own:
        return "unclear", f"raised in {_short(filename)}:{line} ({func})"
    if len(message) < MIN_MESSAGE:
        return "unclear", f"message names nothing: {message!r}"
    if _PYTHON_INTERNAL.search(message) and not re.search(r"[\\/]|\.json|\.gguf|\.safetensors", message):
        return "unclear", "a Python-internal message that names no option, file or value"
    return "clear", ""


# Messages of Python's own operations on the wrong type: they say what Python tried, not what the user gave.
_PYTHON_INTERNAL = re.compile(
    r"dictionary update sequence|string indices must be|object is not (iterable|subscriptable|callable)|"
    r"unhashable type|not supported between instances|has no attribute|can't multiply sequence|"
    r"unsupported operand type|argument after \*\* must be|object cannot be interpreted as an integer|"
    r"invalid literal for int\(\)|could not convert string to float|too many values to unpack|"
    r"not enough values to unpack|cannot reshape array|operands could not be broadcast"
)


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "work"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    return filename


def expect(problem, call, check=None):
    """Run `call()` under the oracle `problem` (None: valid, UNKNOWN: either, else the reason it is invalid);
    `check(result)` returns a list of broken properties of a valid result. Raises a Verdict unless the call
    succeeded on a valid or undecided input; then returns the result."""
    try:
        result = call()
    except Verdict:
        raise
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if problem is None:
            raise Verdict("crash", f"valid input refused: {type(e).__name__}", e) from None
        outcome, note = classify_refusal(e)
        raise Verdict(outcome, note + (f" [invalid because: {problem}]" if outcome != "clear" else ""), e) from None
    if problem not in (None, UNKNOWN):
        raise Verdict("silent", f"invalid input accepted ({problem})")
    if check is not None:
        broken = check(result)
        if broken:
            raise Verdict("silent", "; ".join(broken)[:500])
    return result


# =============================================================================================== worker


class Worker:
    """Everything that runs in the worker process: fixtures, models and one runner per target."""

    def __init__(self, root: Path):
        self.root = root
        self.fixtures = root / "fixtures"
        self.fixtures.mkdir(exist_ok=True)
        self.work = root / "work"
        self.work.mkdir(exist_ok=True)
        self.counter = 0
        self._models = {}
        self._baselines = {}
        import jax

        jax.config.update("jax_platforms", "cpu")
        import ssm_llm.config
        import ssm_llm.generation
        import ssm_llm.speculative.tree

        for name, mine, theirs in (
            ("MAX_NEW_TOKENS", MAX_NEW_TOKENS, ssm_llm.generation.MAX_NEW_TOKENS),
            ("MAX_TREE_NODES", MAX_TREE_NODES, ssm_llm.speculative.tree.MAX_TREE_NODES),
            ("MAX_LAYERS", MAX_LAYERS, ssm_llm.config.MAX_LAYERS),
        ):
            assert mine == theirs, f"the fuzzer's copy of {name} is stale"

    # ------------------------------------------------------------------------------------------ helpers
    def scratch(self) -> Path:
        self.counter += 1
        path = Path(tempfile.mkdtemp(prefix=f"ex{self.counter}-", dir=self.work))
        return path

    def model(self, name: str):
        if name not in self._models:
            import jax

            import ssm_llm

            config = {
                "llama": lambda: ssm_llm.ModelConfig(**LLAMA),
                "mamba": lambda: ssm_llm.MambaConfig(**MAMBA),
                "mamba2": lambda: ssm_llm.Mamba2Config(**MAMBA2),
                "other_vocab": lambda: ssm_llm.ModelConfig(**{**LLAMA, "vocab_size": 64}),
            }[name]()
            self._models[name] = (config, ssm_llm.init_params(config, jax.random.PRNGKey(len(name))))
        return self._models[name]

    def prepare(self, target: str) -> dict:
        """Build what `target` needs on disk (once per run; later workers find it there)."""
        needs = {
            "load_safetensors": ["hf_llama"],
            "load_config_json": ["hf_llama"],
            "load_shard_index": ["hf_llama"],
            "load_pickle": ["hf_llama"],
            "load_gguf": ["gguf"],
            "load_orbax": ["ckpt_llama", "ckpt_mamba2"],
            "cli": ["hf_llama", "gguf", "ckpt_llama", "cli_ckpt"],
        }.get(target, [])
        for name in needs:
            path = self.fixtures / name
            if not (path / ".done").exists():
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir(parents=True)
                getattr(self, f"_build_{name}")(path)
                (path / ".done").write_text("")
        import jax

        return {"backend": jax.default_backend(), "devices": str(jax.devices())}

    def fixture_signature(self) -> dict:
        sig = {}
        for p in sorted(self.fixtures.rglob("*")):
            st_ = p.lstat()
            sig[str(p.relative_to(self.fixtures))] = (st_.st_size, st_.st_mtime_ns) if p.is_file() else None
        return sig

    # ------------------------------------------------------------------------------------------ fixtures
    def _build_hf_llama(self, path: Path):
        import torch
        import transformers

        config = transformers.LlamaConfig(**HF_TINY)
        torch.manual_seed(SEED)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.15)
        model.save_pretrained(path, safe_serialization=True)
        self._tokenizer().save_pretrained(path)
        torch.save(model.state_dict(), path / "state_dict.pt")  # the valid pytorch_model.bin of load_pickle
        outside = self.root / "outside"
        outside.mkdir(exist_ok=True)
        shutil.copy(path / "model.safetensors", outside / "canary.safetensors")

    def _tokenizer(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
        fast.chat_template = (
            "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w4{% endif %}"
        )
        return fast

    def gguf_base(self):
        """(metadata [(key, kind, value)], tensors [(name, array)]) of the tiny llama GGUF, from a fixed RNG
        (llama.cpp's q/k row order does not matter for random weights)."""
        rng = np.random.default_rng(SEED)
        h, f, layers, heads, kv, hd = 32, 64, 2, 4, 2, 8
        meta = [
            ("general.architecture", "str", "llama"),
            ("llama.embedding_length", "u32", h),
            ("llama.feed_forward_length", "u32", f),
            ("llama.block_count", "u32", layers),
            ("llama.attention.head_count", "u32", heads),
            ("llama.attention.head_count_kv", "u32", kv),
            ("llama.context_length", "u32", CONTEXT),
            ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-5),
            ("llama.rope.freq_base", "f32", 10000.0),
            ("tokenizer.ggml.bos_token_id", "u32", 1),
            ("tokenizer.ggml.eos_token_id", "u32", 2),
        ]

        def w(*shape):
            return (0.15 * rng.standard_normal(shape)).astype(np.float32)

        # GGUF shapes are written numpy-style here ([rows, cols] as Hugging Face has them).
        tensors = [("token_embd.weight", w(VOCAB, h)), ("output_norm.weight", 1 + w(h)), ("output.weight", w(VOCAB, h))]
        for i in range(layers):
            tensors += [
                (f"blk.{i}.attn_norm.weight", 1 + w(h)),
                (f"blk.{i}.attn_q.weight", w(heads * hd, h)),
                (f"blk.{i}.attn_k.weight", w(kv * hd, h)),
                (f"blk.{i}.attn_v.weight", w(kv * hd, h)),
                (f"blk.{i}.attn_output.weight", w(h, heads * hd)),
                (f"blk.{i}.ffn_norm.weight", 1 + w(h)),
                (f"blk.{i}.ffn_gate.weight", w(f, h)),
                (f"blk.{i}.ffn_up.weight", w(f, h)),
                (f"blk.{i}.ffn_down.weight", w(h, f)),
            ]
        return meta, tensors

    def _build_gguf(self, path: Path):
        meta, tensors = self.gguf_base()
        write_gguf(path / "tiny.gguf", meta, [(n, a, None) for n, a in tensors])

    def _build_ckpt_llama(self, path: Path):
        import converters

        config, params = self.model("llama")
        converters.save(params, config, path / "ckpt")

    def _build_ckpt_mamba2(self, path: Path):
        import converters

        config, params = self.model("mamba2")
        converters.save(params, config, path / "ckpt")

    def _build_cli_ckpt(self, path: Path):
        import converters

        config, params = self.model("llama")
        converters.save(params, config, path / "ckpt", tokenizer=self._tokenizer())

    # ------------------------------------------------------------------------------------------ dispatch
    def run(self, target: str, payload: dict) -> dict:
        start = time.perf_counter()
        outcome, detail, exc = "ok", "", None
        fixtures = self.fixture_signature()
        try:
            getattr(self, f"run_{target}")(payload)
        except Verdict as v:
            outcome, detail, exc = v.outcome, v.detail, v.exc
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome, detail, exc = "crash", "raised outside the judged call (fuzzer or library)", e
        if self.fixture_signature() != fixtures:  # e.g. a convert that deleted or rewrote its source's original
            outcome, detail = "unsafe", f"the fuzzer's fixtures changed (after a {outcome} outcome: {detail})"
        record = {"outcome": outcome, "detail": detail, "seconds": round(time.perf_counter() - start, 3)}
        if exc is not None:
            filename, func, line = raising_frame(exc)
            lines = str(exc).strip().splitlines()
            message = re.sub(
                r"ex\d+-[A-Za-z0-9_]+", "exN", (lines[0] if lines else "").replace(str(self.root), "$SANDBOX")
            )
            record.update(
                exception=type(exc).__name__, message=message[:300], frame=f"{_short(filename)}:{line} ({func})"
            )
            if outcome in BAD_OUTCOMES:
                record["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
        return record

    # ===================================================================================== generate
    def _materialize_prompts(self, prompts):
        return prompts  # payload values are already concrete (lists, tuples, numpy arrays)

    def _callback(self, kind, sink):
        if kind is None:
            return None
        if kind == "not_callable":
            return "print"
        if kind == "record":
            return lambda step, tokens: sink.append((int(step), np.asarray(tokens).tolist()))
        at = int(kind.rsplit("_", 1)[1])

        def raising(step, tokens):
            sink.append((int(step), np.asarray(tokens).tolist()))
            if step == at:
                raise FuzzCallbackError(f"fuzzer callback raised at step {at}")

        return raising

    def _build_policy(self, desc):
        from ssm_llm import kv, speculative

        if isinstance(desc, Special):
            return (
                (speculative.PromptLookup(), "a drafter where a policy belongs")
                if desc.name == "drafter"
                else (object(), "an object")
            )
        if not isinstance(desc, dict):
            return desc, f"kv_compression={desc!r}"
        problem = policy_ctor_problem(desc["cls"], desc["kwargs"])
        kwargs = {k: self._value(v) for k, v in desc["kwargs"].items()}
        policy = expect(problem, lambda: getattr(kv, desc["cls"])(**kwargs))
        return policy, None

    def _value(self, v):
        if isinstance(v, Special):
            if v.name == "wide_template":
                from ssm_llm.speculative import WIDE_TEMPLATE

                return WIDE_TEMPLATE
            if v.name == "huge_template":
                return tuple((0, 0) for _ in range(1)) + tuple((i, 0) for i in range(1, 2000))
            return object()
        return v

    def _draft(self, kind):
        """(params, config, vocab) of a draft model description."""
        from ssm_llm.speculative import self_speculative

        if kind == "skip":
            config, params = self.model("llama")
            params, config = self_speculative(params, config, [0])
            return params, config, config.vocab_size
        if kind == "config_dict":
            config, params = self.model("llama")
            return params, config.to_dict(), None
        if kind == "self":
            kind = "llama"
        config, params = self.model(kind)
        return params, config, config.vocab_size

    def _build_drafter(self, desc, target_model):
        from ssm_llm import kv, speculative

        if isinstance(desc, Special):
            return (
                (kv.StreamingLLM(budget=8), "a policy where a drafter belongs")
                if desc.name == "policy"
                else (object(), "an object")
            )
        if not isinstance(desc, dict):
            return desc, f"speculative={desc!r}"
        name, kwargs = desc["cls"], {k: self._value(v) for k, v in desc["kwargs"].items()}
        draft_vocab = None
        if name in ("DraftModel", "RSD", "DySpec"):
            kind = desc["draft"]
            if kind == "self":
                kind = target_model if target_model != "llama" else "llama"
            params, config, draft_vocab = self._draft(kind)
            problem = drafter_ctor_problem(name, desc["kwargs"], draft_vocab, desc["draft"])
            drafter = expect(problem, lambda: getattr(speculative, name)(params, config, **kwargs))
        else:
            problem = drafter_ctor_problem(name, desc["kwargs"], None, None)
            drafter = expect(problem, lambda: getattr(speculative, name)(**kwargs))
        return drafter, None, draft_vocab

    def _misuse(self, kind, model_name, params, config, gen_config):
        """Apply a misuse of the call's arguments; returns (params, config, gen_config, problem)."""
        import jax.numpy as jnp

        import ssm_llm

        if kind is None:
            return params, config, gen_config, None
        if kind == "config_dict":
            return params, config.to_dict(), gen_config, "config passed as a dict"
        if kind == "config_str":
            return params, "llama", gen_config, "config passed as a string"
        if kind == "other_family_params":
            other = "mamba" if model_name != "mamba" else "llama"
            return self.model(other)[1], config, gen_config, "params of another family"
        if kind == "gen_config_dict":
            return params, config, dataclasses.asdict(gen_config) if gen_config is not None else {}, "gen_config a dict"
        if kind == "params_none":
            return None, config, gen_config, "params None"
        if kind == "params_wrong_shape":
            return {**params, "embed": params["embed"][: VOCAB - 1]}, config, gen_config, "embed one row short"
        if kind == "params_int_dtype":
            return {**params, "embed": params["embed"].astype(jnp.int32)}, config, gen_config, "int embed"
        if kind == "params_missing_key":
            return {k: v for k, v in params.items() if k != "embed"}, config, gen_config, "embed missing"
        if kind == "params_unstacked":
            return ssm_llm.unstack_layers(params), config, gen_config, None
        raise AssertionError(kind)

    def _generate(self, payload):
        import ssm_llm

        payload = dict(payload)
        for key in ("policy", "drafter"):  # placeholders become the objects they stand for, for oracle and call
            if isinstance(payload.get(key), dict):
                payload[key] = {
                    **payload[key],
                    "kwargs": {k: self._value(v) for k, v in payload[key]["kwargs"].items()},
                }
        model_name = payload["model"]
        config, params = self.model(model_name)
        gen = {k: self._value(v) for k, v in payload["gen"].items()}
        policy_desc, drafter_desc = payload.get("policy"), payload.get("drafter")
        policy_ok = drafter_ok = True
        draft_vocab = None
        if policy_desc is not None:
            policy, bad = self._build_policy(policy_desc)
            policy_ok = bad is None
            gen["kv_compression"] = policy
        if drafter_desc is not None:
            drafter, bad, *rest = self._build_drafter(drafter_desc, model_name)
            draft_vocab = rest[0] if rest else None
            drafter_ok = bad is None
            gen["speculative"] = drafter
        problem = gen_config_problem(
            payload["gen"] | {k: gen[k] for k in ("kv_compression", "speculative") if k in gen}, policy_ok, drafter_ok
        )
        gen_config = expect(problem, lambda: ssm_llm.GenerationConfig(**gen))

        params, config, gen_config, misuse_problem = self._misuse(
            payload["misuse"], model_name, params, config, gen_config
        )
        prompts = payload["prompts"]
        sink = []
        callback = self._callback(payload["on_token"], sink)
        problem = misuse_problem or self._request_problem(model_name, gen, prompts, payload, draft_vocab)
        raising = payload["on_token"] in ("raise_at_0", "raise_at_2")

        def call():
            return ssm_llm.generate(params, config, prompts, gen_config, on_token=callback)

        if raising and problem is None:
            try:
                result = call()
            except FuzzCallbackError:
                raise Verdict("clear", "the callback's own exception came back") from None
            except BaseException as e:
                raise Verdict("crash", "a raising on_token callback surfaced as another exception", e) from None
            mnt = gen_config.max_new_tokens
            at = int(payload["on_token"].rsplit("_", 1)[1])
            if at < mnt and not all(
                r == "eos" and len(t) < at for t, r in zip(result.tokens, result.finish_reasons, strict=True)
            ):
                raise Verdict("silent", "the on_token callback raised, generate returned normally")
            return
        result = expect(
            problem,
            call,
            lambda r: self._check_generation(
                r, model_name, params, config, prompts, gen_config, sink, payload["on_token"]
            ),
        )
        return result

    def _request_problem(self, model_name, gen, prompts, payload, draft_vocab):
        """The generate-time oracle: prompts, EOS ids against the vocabulary, context and option limits."""
        problem = prompts_problem(prompts, VOCAB)
        if problem:
            return problem
        eos = gen.get("eos_token_ids")
        eos = (2,) if eos is None else eos
        problem = token_ids_problem(eos, VOCAB)
        if problem:
            return "eos_token_ids: " + problem
        if payload["on_token"] == "not_callable":
            return "on_token not callable"
        lengths = [len(p) for p in prompts]
        longest, mnt = max(lengths), int(gen.get("max_new_tokens", 64))
        policy, drafter = payload.get("policy"), payload.get("drafter")
        unbounded = isinstance(policy, dict) and policy_unbounded(policy["cls"], policy["kwargs"])
        if gen.get("max_len") is not None and longest + mnt > gen["max_len"]:
            return "longest prompt + max_new_tokens > max_len"
        if model_name == "llama":
            if longest > CONTEXT or (longest + mnt > CONTEXT and not unbounded):
                return "past the model's context"
            if gen.get("max_len") is not None and gen["max_len"] > 10**9:
                return "a KV cache of max_len positions cannot fit in memory"
        if isinstance(policy, dict):
            if model_name != "llama":
                return "kv_compression on a state-space model"
            padded = min(-(-longest // 16) * 16, gen.get("max_len") or 10**9)
            problem = policy_model_problem(policy["cls"], policy["kwargs"], lengths, padded)
            if problem:
                return problem
        if isinstance(drafter, dict):
            if payload["on_token"] is not None:
                return "on_token with speculative decoding"
            problem = drafter_model_problem(drafter["cls"], drafter["kwargs"], draft_vocab)
            if problem:
                return problem
        return None

    def _check_generation(self, result, model_name, params, config, prompts, gen_config, sink, on_token):
        import ssm_llm

        broken = []
        n = len(prompts)
        mnt = gen_config.max_new_tokens
        eos = set(gen_config.eos_token_ids if gen_config.eos_token_ids is not None else config.eos_token_ids)
        if len(result.tokens) != n or len(result.finish_reasons) != n:
            return [f"{len(result.tokens)} rows for {n} prompts"]
        for i, (toks, reason) in enumerate(zip(result.tokens, result.finish_reasons, strict=True)):
            if any(not (isinstance(t, int) and 0 <= t < VOCAB) for t in toks):
                broken.append(f"row {i}: token outside [0, {VOCAB})")
            if len(toks) > mnt:
                broken.append(f"row {i}: {len(toks)} tokens > max_new_tokens {mnt}")
            if reason not in ("eos", "length"):
                broken.append(f"row {i}: finish reason {reason!r}")
            if reason == "length" and len(toks) != mnt:
                broken.append(f"row {i}: 'length' after {len(toks)} of {mnt} tokens")
            if reason == "eos" and len(toks) >= mnt:
                broken.append(f"row {i}: 'eos' with {len(toks)} tokens")
            if eos & set(toks):
                broken.append(f"row {i}: EOS inside the returned tokens")
        if on_token == "record":
            for i, toks in enumerate(result.tokens):
                streamed = []
                for _, step_tokens in sorted(sink):
                    t = step_tokens[i]
                    if t < 0 or t in eos:
                        break
                    streamed.append(t)
                if streamed != toks:
                    broken.append(f"row {i}: streamed {streamed} != returned {toks}")
        lossless = gen_config.kv_compression is None
        if (
            not broken
            and gen_config.temperature == 0
            and lossless
            and (
                gen_config.speculative is not None
                or gen_config != ssm_llm.GenerationConfig(max_new_tokens=mnt, eos_token_ids=gen_config.eos_token_ids)
                or not isinstance(params["layers"], dict)
            )
        ):
            base_params = self.model(model_name)[1]
            ref = ssm_llm.generate(
                base_params,
                config,
                prompts,
                ssm_llm.GenerationConfig(max_new_tokens=mnt, eos_token_ids=tuple(sorted(eos))),
            )
            for i, (got, want) in enumerate(zip(result.tokens, ref.tokens, strict=True)):
                if got != want and not self._tie(model_name, list(prompts[i]), got, want):
                    broken.append(f"row {i}: greedy {got} != plain greedy {want}")
        return broken

    def _tie(self, model_name, prompt, got, want) -> bool:
        """True if the first divergence of two greedy continuations is a near-tie of the logits."""
        import ssm_llm

        config, params = self.model(model_name)
        i = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        if i >= len(got) or i >= len(want):
            return False  # one stopped (EOS) where the other did not: not a tie of two tokens
        ids = np.asarray([[int(t) for t in prompt] + want[:i]], np.int32)
        logits, _ = ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, 1, ids.shape[1]))
        last = np.asarray(logits[0, -1], np.float64)
        return abs(last[got[i]] - last[want[i]]) <= 1e-4 * max(1.0, np.abs(last).max())

    def run_generate_options(self, payload):
        self._generate(payload)

    def run_generate_kv(self, payload):
        self._generate(payload)

    def run_generate_speculative(self, payload):
        self._generate(payload)

    # ====================================================================================== forward
    def _tokens(self, payload):
        """(tokens object, its problem or None, the int matrix it stands for or None)."""
        ids, form = payload["ids"], payload["token_form"]
        matrix = np.asarray(ids, np.int64)
        if form == "int32":
            return np.asarray(ids, np.int32), None, matrix
        if form == "int64":
            return np.asarray(ids, np.int64), None, matrix
        if form == "list":
            return ids, None, matrix
        if form == "uint8":
            if (matrix < 0).any() or (matrix > 255).any():
                return np.asarray(np.clip(matrix, 0, 255), np.uint8), None, np.clip(matrix, 0, 255)
            return matrix.astype(np.uint8), None, matrix
        if form == "float32":
            return matrix.astype(np.float32), "float token ids", None
        if form == "bool":
            return matrix > 0, "bool token ids", None
        if form == "1d":
            return matrix[0], "1-D tokens", None
        if form == "3d":
            return matrix[:, :, None], "3-D tokens", None
        if form == "empty_steps":
            return np.zeros((matrix.shape[0], 0), np.int32), "no steps", None
        if form == "ragged":
            return [ids[0], ids[0] + [1]] if len(ids) > 1 else [[1, 2], [3]], "ragged token rows", None
        if form == "huge_int64":
            bad = matrix.copy()
            bad[0, 0] = 2**32 + 5
            return bad, "token id 2**32 + 5", None
        if form == "object":
            return np.asarray(ids, object), "object array", None
        if form == "string":
            return "w3 w4", "a string", None
        raise AssertionError(form)

    def _counts(self, payload, batch, steps):
        form, counts = payload["counts_form"], payload["counts"][:batch]
        if form is None:
            return None, None, [steps] * batch
        if form == "valid":
            return np.asarray(counts, np.int32), None, counts
        if form == "list":
            return list(counts), None, counts
        if form == "negative":
            return np.asarray([-1] + counts[1:], np.int32), "negative token count", [-1] + counts[1:]
        if form == "too_many":
            return np.asarray([steps + 1] + counts[1:], np.int32), "token count > steps", [steps + 1] + counts[1:]
        if form == "wrong_shape":
            return np.asarray(counts + [1], np.int32), "token_counts of the wrong shape", None
        if form == "float":
            return np.asarray(counts, np.float32), "float token_counts", None
        if form == "bool":
            return np.asarray(counts, bool), "bool token_counts", None
        if form == "scalar":
            return counts[0], "a scalar token_counts", None
        if form == "string":
            return "1", "a string token_counts", None
        raise AssertionError(form)

    def _cache(self, payload, config, params, batch):
        """(cache, problem, prefix ids per row or None, max_len or None)."""
        import ssm_llm

        kind, max_len, prefix = payload["cache"], payload["max_len"], payload["prefix"]
        attention = isinstance(config, ssm_llm.ModelConfig)
        if kind == "none":
            return None, "no cache", None, None
        if kind == "dict":
            return {"k": 1}, "a dict for a cache", None, None
        if kind == "other_family":
            other = "mamba" if attention else "llama"
            return ssm_llm.init_cache(self.model(other)[0], batch, 8), "a cache of another family", None, None
        if kind == "other_batch":
            return ssm_llm.init_cache(config, batch + 1, max_len), "cache batch differs", None, None
        if kind == "small":
            return ssm_llm.init_cache(config, batch, 1), None, [[] for _ in range(batch)], 1 if attention else None
        cache = ssm_llm.init_cache(config, batch, max_len)
        if kind == "fresh":
            return cache, None, [[] for _ in range(batch)], max_len if attention else None
        fill = max_len if kind == "full" else prefix
        pre = [[(3 * b + 5 * j + 1) % VOCAB for j in range(fill)] for b in range(batch)]
        _, cache = ssm_llm.forward(params, config, np.asarray(pre, np.int32), cache)
        return cache, None, pre, max_len if attention else None

    def _forward_reference(self, model_name, prefix, row_tokens):
        """Logits [n, V] of `row_tokens` after `prefix`, from a fresh single-row forward (float64 copy)."""
        import ssm_llm

        config, params = self.model(model_name)
        ids = np.asarray([list(prefix) + list(row_tokens)], np.int32)
        logits, _ = ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, 1, ids.shape[1]))
        return np.asarray(logits[0, len(prefix) :], np.float64)

    def _forward_setup(self, payload):
        import ssm_llm

        model_name = payload["model"]
        config, params = self.model(model_name)
        tokens, tok_problem, matrix = self._tokens(payload)
        batch = len(payload["ids"])
        steps = len(payload["ids"][0])
        counts, count_problem, count_values = self._counts(payload, batch, steps)
        cache, cache_problem, prefix, max_len = self._cache(payload, config, params, batch)
        misuse = payload.get("misuse")
        if misuse == "params_wrong_shape":
            params = {**params, "embed": params["embed"][: VOCAB - 1]}
        elif misuse == "config_dict":
            config = config.to_dict()
        attention = model_name == "llama"
        return (
            model_name,
            config,
            params,
            tokens,
            tok_problem,
            matrix,
            batch,
            steps,
            counts,
            count_problem,
            count_values,
            cache,
            cache_problem,
            prefix,
            max_len,
            misuse,
            attention,
            ssm_llm,
        )

    def run_forward(self, payload):
        (
            model_name,
            config,
            params,
            tokens,
            tok_problem,
            matrix,
            batch,
            steps,
            counts,
            count_problem,
            count_values,
            cache,
            cache_problem,
            prefix,
            max_len,
            misuse,
            attention,
            ssm_llm,
        ) = self._forward_setup(payload)
        problem = (f"misuse: {misuse}" if misuse else None) or tok_problem or cache_problem or count_problem
        if problem is None:
            if ((matrix < 0) | (matrix >= VOCAB)).any():
                problem = "a token id outside the vocabulary"
            elif attention and steps > max_len:
                problem = "more steps than the cache holds"
            elif attention and any(len(p) + c > max_len for p, c in zip(prefix, count_values, strict=True)):
                problem = "cache overflow"

        def check(out):
            logits, new_cache = out
            logits = np.asarray(logits, np.float64)
            broken = []
            if logits.shape != (batch, steps, VOCAB):
                return [f"logits shape {logits.shape}"]
            for b in range(batch):
                n = count_values[b]
                if n == 0:
                    continue
                ref = self._forward_reference(model_name, prefix[b], matrix[b, :n])
                if not np.isfinite(logits[b, :n]).all():
                    broken.append(f"row {b}: non-finite logits for valid tokens")
                elif not np.allclose(logits[b, :n], ref, atol=2e-4, rtol=2e-3):
                    broken.append(
                        f"row {b}: logits differ from a fresh forward by {np.abs(logits[b, :n] - ref).max():.2e}"
                    )
            want = [len(p) + c for p, c in zip(prefix, count_values, strict=True)]
            if np.asarray(new_cache.lengths).tolist() != want:
                broken.append(f"cache lengths {np.asarray(new_cache.lengths).tolist()} != {want}")
            return broken

        expect(problem, lambda: ssm_llm.forward(params, config, tokens, cache, token_counts=counts), check)

    def run_forward_jit(self, payload):
        import jax
        import jax.numpy as jnp
        from jax.experimental import checkify

        (
            model_name,
            config,
            params,
            tokens,
            tok_problem,
            matrix,
            batch,
            steps,
            counts,
            count_problem,
            count_values,
            cache,
            cache_problem,
            prefix,
            max_len,
            misuse,
            attention,
            ssm_llm,
        ) = self._forward_setup(payload)
        # Static problems (shapes, dtypes, types) must still raise at trace time; value problems poison rows.
        static_problem = (f"misuse: {misuse}" if misuse else None) or tok_problem or cache_problem
        if static_problem is None and payload["counts_form"] in ("wrong_shape", "float", "bool"):
            static_problem = count_problem
        if static_problem is None and attention and steps > max_len:
            static_problem = "more steps than the cache holds"
        if counts is None:
            counts_arr, count_values = None, [steps] * batch
        else:
            counts_arr = jnp.asarray(np.asarray(counts))
        tokens_arr = jnp.asarray(tokens) if not isinstance(tokens, str) else tokens
        checkified = payload["mode"] == "checkify"

        def f(p, t, c, n):
            return ssm_llm.forward(p, config, t, c, token_counts=n, checkify_errors=checkified)

        fn = jax.jit(checkify.checkify(f)) if checkified else jax.jit(f)
        out = expect(
            static_problem or UNKNOWN if static_problem else None, lambda: fn(params, tokens_arr, cache, counts_arr)
        )
        if static_problem:
            return
        bad_rows = []
        for b in range(batch):
            n = count_values[b]
            bad = not (0 <= n <= steps) or ((matrix[b, : max(n, 0)] < 0) | (matrix[b, : max(n, 0)] >= VOCAB)).any()
            bad |= attention and len(prefix[b]) + n > max_len
            bad_rows.append(bool(bad))
        if checkified:
            err, (logits, _) = out
            message = err.get()
            if any(bad_rows) and message is None:
                raise Verdict("silent", f"rows {bad_rows} are bad but checkify reported no error")
            if not any(bad_rows) and message is not None:
                raise Verdict("crash", f"checkify error on valid rows: {message.splitlines()[0]}")
            if any(bad_rows):
                raise Verdict("clear", "checkify error")
        else:
            logits, _ = out
        logits = np.asarray(logits, np.float64)
        broken = []
        for b in range(batch):
            n = count_values[b]
            if bad_rows[b]:
                if not np.isnan(logits[b]).all():
                    broken.append(f"row {b} is bad ({'id' if 0 <= n <= steps else 'count'}) but has non-NaN logits")
                continue
            if n == 0:
                continue
            ref = self._forward_reference(model_name, prefix[b], matrix[b, :n])
            if not np.allclose(logits[b, :n], ref, atol=2e-4, rtol=2e-3):
                broken.append(f"row {b}: jitted logits differ from a fresh forward")
        if broken:
            raise Verdict("silent", "; ".join(broken))
        if any(bad_rows):
            raise Verdict("clear", "bad rows came back as NaN logits")

    # ==================================================================================== safetensors
    def _hf_copy(self) -> Path:
        work = self.scratch()
        model = work / "model"
        shutil.copytree(
            self.fixtures / "hf_llama",
            model,
            ignore=shutil.ignore_patterns(".done", "state_dict.pt", "tokenizer*", "chat*"),
        )
        return model

    def _load_baseline(self, key, fn):
        if key not in self._baselines:
            self._baselines[key] = fn()
        return self._baselines[key]

    def run_load_safetensors(self, payload):
        import safetensors.numpy

        import converters

        model = self._hf_copy()
        path = model / "model.safetensors"
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        data = bytearray(raw[8 + n :])
        header_bytes, size_override, tail, duplicate = None, None, b"", False
        names = [k for k in header if k != "__metadata__"]
        for op in payload["ops"]:
            kind = op["kind"]
            name = names[op["tensor"] % len(names)] if names else None
            entry = header.get(name) if name else None
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if (
                kind == "offsets"
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(is_int(o) for o in offsets)
            ):
                b, e = offsets
                entry["data_offsets"] = {
                    "overlap": [max(0, b - 4), e - 4] if b >= 4 else [b, e],
                    "reverse": [e, b],
                    "negative": [-4, e - b - 4],
                    "gap": [b + 4, e + 4],
                    "shift": [b + 1, e + 1],
                    "huge": [b, 2**64 - 1],
                    "float": [float(b), float(e)],
                    "string": [str(b), str(e)],
                    "three": [b, e, e],
                    "one_short": [b, e - 1],
                    "swap_two": None,
                }[op["how"]] or entry["data_offsets"]
                if (
                    op["how"] == "swap_two"
                    and len(names) > 1
                    and isinstance(header.get(names[(op["tensor"] + 1) % len(names)]), dict)
                ):
                    other = header[names[(op["tensor"] + 1) % len(names)]]
                    entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
            elif kind == "shape" and entry is not None:
                s = entry["shape"]
                entry["shape"] = {
                    "transpose": s[::-1],
                    "drop_dim": s[1:],
                    "add_one": s + [1],
                    "zero": [0] + s[1:],
                    "negative": [-s[0]] + s[1:],
                    "float": [float(x) for x in s],
                    "huge": [2**62] + s[1:],
                    "string": [str(x) for x in s],
                    "double_first": [2 * s[0]] + s[1:],
                }[op["shape"]]
            elif kind == "dtype" and entry is not None:
                entry["dtype"] = op["dtype"]
            elif kind == "header_size":
                size_override = op["size"]
            elif kind == "flip_header":
                header_bytes = bytearray(header_bytes or json.dumps(header).encode())
                header_bytes[op["pos"] % len(header_bytes)] ^= op["byte"]
            elif kind == "flip_data" and data:
                data[op["pos"] % len(data)] ^= op["byte"]
            elif kind == "truncate" and data:
                data = data[: op["pos"] % len(data)]
            elif kind == "append":
                tail += bytes([op["byte"]]) * (1 + op["pos"] % 16)
            elif kind == "duplicate_key" and name:
                duplicate = True
                header_bytes = (json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}").encode()
            elif kind == "metadata":
                header["__metadata__"] = op["metadata"]
            elif kind == "drop_tensor" and name:
                header.pop(name)
                names.remove(name)
            elif kind == "rename_tensor" and name:
                header[name + ".x"] = header.pop(name)
                names[names.index(name)] = name + ".x"
            elif kind == "header_not_object":
                header_bytes = json.dumps(list(header)).encode()
            elif kind == "reorder":
                header = dict(reversed(list(header.items())))
            elif kind == "pad_header":
                header_bytes = (header_bytes or json.dumps(header).encode()) + b" " * (1 + op["pos"] % 8)
        body = bytes(header_bytes) if header_bytes is not None else json.dumps(header).encode()
        size = len(body)
        size = {
            None: size,
            "zero": 0,
            "huge": 2**40,
            "minus_one": size - 1,
            "plus_one": size + 1,
            "2**63": 2**63,
            "file_size": len(body) + len(data) + 8,
        }[size_override]
        path.write_bytes(struct.pack("<Q", size % 2**64) + body + bytes(data) + tail)

        # The oracle: the official reader, then the same loader on a canonical rewrite of what it read.
        try:
            official = safetensors.numpy.load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any refusal of the official reader
            official, why = None, f"the official safetensors reader refuses it ({type(e).__name__})"
        if official is None:
            expect(why, lambda: converters.load(model))
            return
        if duplicate:  # the official reader keeps the last of two same-named entries; refusing them is stricter
            expect(UNKNOWN, lambda: converters.load(model))
            return
        canonical = self.scratch() / "model"
        shutil.copytree(model, canonical)
        safetensors.numpy.save_file(official, str(canonical / "model.safetensors"))
        try:
            want = converters.load(canonical)
            problem = None
        except EXPECTED_ERRORS as e:
            want, problem = None, f"its canonical rewrite is refused too ({type(e).__name__}: {str(e)[:80]})"

        def check(got):
            return (
                [] if _same_params(got[1], want[1]) and got[0] == want[0] else ["params differ from the canonical load"]
            )

        expect(problem, lambda: converters.load(model), check)

    # ==================================================================================== config.json
    def run_load_config_json(self, payload):
        import converters

        model = self._hf_copy()
        original = json.loads((model / "config.json").read_text())
        config = dict(original)
        for op in payload["ops"]:
            if op["kind"] == "remove":
                config.pop(op["key"], None)
            else:
                config[op["key"]] = op["value"]
        whole = payload["whole"]
        text = {
            None: None,
            "list": json.dumps([config]),
            "string": json.dumps("llama"),
            "number": "5",
            "null": "null",
            "invalid_json": json.dumps(config)[:-2],
            "empty": "",
        }[whole]
        (model / "config.json").write_text(text if text is not None else json.dumps(config))
        problem = f"config.json holds {whole}" if whole else hf_config_problem(config, original)

        def check(out):
            got = out[0]
            return [] if whole else hf_config_mismatch(config, got)

        expect(problem, lambda: converters.load(model), check)

    # =================================================================================== shard index
    def run_load_shard_index(self, payload):
        import converters

        model = self._hf_copy()
        inside = model / "model.safetensors"
        names = json.loads(_st_header(inside)).keys() - {"__metadata__"}
        names = sorted(names)
        blob = inside.read_bytes()
        if not payload["keep_single"]:
            inside.unlink()
        copy = payload["inside_copy"]
        if copy:
            _write(model / copy, blob)
        entries = [e.replace("/ABS/", str(self.root) + "/") if isinstance(e, str) else e for e in payload["entries"]]
        layout = payload["layout"]
        if layout == "all_to_first":
            weight_map = {n: entries[0] for n in names}
        else:
            weight_map = {n: entries[i % len(entries)] for i, n in enumerate(names)}
        index = {"metadata": {}, "weight_map": weight_map}
        if layout == "not_object":
            index = [weight_map]
        elif layout == "no_weight_map":
            index = {"metadata": {}}
        elif layout == "weight_map_list":
            index = {"weight_map": list(weight_map.items())}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))

        def resolves_inside(name):
            if not isinstance(name, str) or not name or "\0" in name:
                return False
            parts = Path(name.replace("\\", "/"))
            return not parts.is_absolute() and ".." not in parts.parts and not re.match(r"^[A-Za-z]:", name)

        outside = (
            isinstance(index, dict)
            and isinstance(index.get("weight_map"), dict)
            and not payload["keep_single"]
            and not all(resolves_inside(v) for v in weight_map.values())
        )
        single = (model / "model.safetensors").is_file()
        outside = outside and not single
        problem = None
        if single:
            problem = None  # model.safetensors present: the index is not read
        elif not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
            problem = "corrupt index"
        elif outside:
            problem = "a shard outside the model directory"
        elif not all(isinstance(v, str) and v and (model / v).is_file() for v in weight_map.values()):
            problem = "a listed shard is missing"
        elif len({(model / v).resolve() for v in weight_map.values()}) > 1:
            problem = "the same tensors in two shards"
        try:
            expect(problem, lambda: converters.load(model))
        except Verdict as v:
            if v.outcome == "silent" and outside:
                raise Verdict("unsafe", f"loaded weights from outside the model directory: {weight_map}") from None
            raise

    # ======================================================================================== pickles
    def run_load_pickle(self, payload):
        import pickle

        import torch

        import converters

        model = self._hf_copy()
        (model / "model.safetensors").unlink()
        marker = self.root / "markers" / f"marker-{self.counter}"
        marker.parent.mkdir(exist_ok=True)
        evil = _Evil(str(marker), payload["callable"])
        state = torch.load(self.fixtures / "hf_llama" / "state_dict.pt", weights_only=True)
        target = model / "pytorch_model.bin"
        form = payload["form"]
        problem = "a pickle that calls a function"
        if form == "torch_top":
            torch.save(evil, target)
        elif form == "torch_nested":
            torch.save({**state, "extra": {"x": evil}}, target)
        elif form == "torch_value":
            torch.save({**state, "model.norm.weight": evil}, target)
        elif form == "raw_pickle":
            target.write_bytes(pickle.dumps(evil))
        elif form == "legacy_torch":
            torch.save({**state, "x": evil}, target, _use_new_zipfile_serialization=False)
        elif form == "valid":
            torch.save(state, target)
            problem = None
        elif form == "state_not_dict":
            torch.save(list(state.values()), target)
            problem = "a list, not a state dict"
        elif form == "non_tensor_value":
            torch.save({**state, "x": 3}, target)
            problem = "a non-tensor entry"
        elif form == "truncated_valid":
            torch.save(state, target)
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            problem = "a truncated file"
        elif form == "garbage":
            target.write_bytes(b"\x80\x04garbage" * 10)
            problem = "garbage"

        def check(out):
            want = self._load_baseline("hf", lambda: converters.load(self.fixtures / "hf_llama"))
            return [] if _same_params(out[1], want[1]) else ["params differ from the safetensors load"]

        try:
            expect(problem, lambda: converters.load(model), check)
        finally:
            if marker.exists():
                raise Verdict("unsafe", f"the pickle ran {payload['callable']}: marker file created")

    # =========================================================================================== GGUF
    def run_load_gguf(self, payload):
        import gguf

        import converters

        meta, tensors = self.gguf_base()
        meta = list(meta)
        tensors = [[n, a, None] for n, a in tensors]
        raw_ops = []
        kinds = {
            "u8": gguf.GGUFValueType.UINT8,
            "u32": gguf.GGUFValueType.UINT32,
            "i32": gguf.GGUFValueType.INT32,
            "u64": gguf.GGUFValueType.UINT64,
            "i64": gguf.GGUFValueType.INT64,
            "f32": gguf.GGUFValueType.FLOAT32,
            "f64": gguf.GGUFValueType.FLOAT64,
            "bool": gguf.GGUFValueType.BOOL,
            "str": gguf.GGUFValueType.STRING,
        }
        del kinds
        for op in payload["ops"]:
            kind = op["kind"]
            i = op["tensor"] % len(tensors)
            if kind == "meta_set":
                meta = [m for m in meta if m[0] != op["key"]] + [(op["key"], *op["value"])]
            elif kind == "meta_remove":
                meta = [m for m in meta if m[0] != op["key"]]
            elif kind == "tensor_drop":
                tensors.pop(i)
            elif kind == "drop_output":
                tensors = [t for t in tensors if t[0] != "output.weight"]
            elif kind == "tensor_shape":
                a = tensors[i][1]
                how = op["how"]
                tensors[i][1] = (
                    a.T.copy()
                    if how == "transpose" and a.ndim == 2
                    else a[:-1].copy()
                    if how == "rows_minus_one"
                    else a[None].copy()
                    if how == "extra_dim"
                    else a
                )
            elif kind == "tensor_dtype":
                tensors[i][2] = op["how"] if op["how"] in ("F16", "Q8_0", "BF16") else None
            elif kind == "tensor_extra":
                name = op["how"] if "." in op["how"] and op["how"] not in ("F16", "Q8_0", "BF16") else "unknown.weight"
                if name not in [t[0] for t in tensors]:
                    tensors.append([name, np.ones(4, np.float32), None])
            elif kind == "tensor_rename":
                tensors[i][0] = tensors[i][0] + ".x"
            elif kind in ("flip", "truncate"):
                raw_ops.append(op)
        work = self.scratch()
        path = work / "model.gguf"
        try:
            write_gguf(path, meta, tensors)
        except Exception:  # noqa: BLE001 - the writer refuses some mutations: nothing to load
            return
        if raw_ops:
            blob = bytearray(path.read_bytes())
            for op in raw_ops:
                if op["kind"] == "flip" and blob:
                    blob[op["pos"] % len(blob)] ^= op["byte"]
                elif blob:
                    blob = blob[: op["pos"] % len(blob)]
            path.write_bytes(bytes(blob))
        problem, want = gguf_oracle(path)
        expect(
            problem, lambda: converters.load(path), lambda out: gguf_mismatch(want, out[0]) if want is not None else []
        )

    # ========================================================================================== orbax
    def run_load_orbax(self, payload):
        import converters

        model_name = payload["model"]
        source = self.fixtures / f"ckpt_{model_name}" / "ckpt"
        ckpt = self.scratch() / "ckpt"
        shutil.copytree(source, ckpt)
        meta_path = ckpt / "ssm_llm_config.json"
        meta = json.loads(meta_path.read_text())
        original = json.loads(json.dumps(meta["config"]))
        problem = None
        files = sorted(p for p in (ckpt / "params").rglob("*") if p.is_file())
        damaged = []
        for op in payload["ops"]:
            kind = op["kind"]
            cfg = meta.get("config") if isinstance(meta, dict) else None
            if kind == "config_set" and isinstance(cfg, dict):
                cfg[op["key"]] = op["value"]
            elif kind == "config_remove" and isinstance(cfg, dict):
                cfg.pop(op["key"], None)
            elif kind == "meta" and isinstance(meta, dict):
                if op["meta"] == "version_2":
                    meta["format_version"] = 2
                elif op["meta"] == "version_str":
                    meta["format_version"] = "1"
                elif op["meta"] == "no_config":
                    meta.pop("config", None)
                elif op["meta"] == "config_list":
                    meta["config"] = [meta.get("config")]
                elif op["meta"] == "quantized_bogus":
                    meta["quantized_weights"] = {"embed": {"bits": 4, "group_size": 32}}
                elif op["meta"] == "list":
                    meta = [meta]
            elif kind == "whole_config":
                meta = "not a checkpoint"
            elif kind.startswith("file_") and files:
                f = files[op["file"] % len(files)]
                if not f.exists():
                    continue
                damaged.append(f"{kind[5:]} {f.relative_to(ckpt / 'params')}")
                blob = bytearray(f.read_bytes())
                if kind == "file_delete":
                    f.unlink()
                elif kind == "file_flip" and blob:
                    blob[op["pos"] % len(blob)] ^= op["byte"]
                    f.write_bytes(bytes(blob))
                elif kind == "file_truncate":
                    f.write_bytes(bytes(blob[: op["pos"] % max(1, len(blob))]))
                elif kind == "file_garbage":
                    f.write_bytes(b"garbage" * 5)
        meta_path.write_text(json.dumps(meta))
        problem = orbax_meta_problem(meta, original, model_name)
        if damaged and problem is None:
            problem = UNKNOWN  # damaged storage: refusing is right; loading must give back the saved params

        def check(out):
            config, params = out
            broken = orbax_config_mismatch(meta["config"], config)
            want = self.model(model_name)[1]
            if not _same_params(params, want):
                broken.append(f"params differ from the saved ones (storage damaged: {damaged})")
            return broken

        expect(problem, lambda: converters.load(ckpt), check)

    # ===================================================================================== text specs
    def run_spec_policy(self, payload):
        from ssm_llm.kv.spec import parse_policy

        problem, cls_name, kwargs = spec_oracle(
            payload["text"],
            {n.lower(): n for n in POLICY_FIELDS},
            lambda n, k: policy_ctor_problem(n, k),
            {n: set(s["required"]) | set(s["defaults"]) for n, s in POLICY_FIELDS.items()},
        )
        marker = Path.cwd() / "__fuzz_marker__"

        def check(policy):
            from ssm_llm import kv

            want = getattr(kv, cls_name)(**kwargs)
            return [] if policy == want else [f"parsed {policy!r} != {want!r}"]

        expect(problem, lambda: parse_policy(payload["text"]), check)
        if marker.exists():
            raise Verdict("unsafe", "a spec string executed code")

    def run_spec_drafter(self, payload):
        from ssm_llm.speculative.spec import parse_drafter

        fields = {
            "PromptLookup": {"num_tokens", "max_ngram", "min_ngram"},
            "TokenRecycling": {"candidates", "template"},
        }
        problem, cls_name, kwargs = spec_oracle(
            payload["text"],
            {"prompt_lookup": "PromptLookup", "token_recycling": "TokenRecycling"},
            lambda n, k: drafter_ctor_problem(n, k, None, None),
            fields,
        )

        def check(drafter):
            import ssm_llm.speculative as spec

            want = getattr(spec, cls_name)(**kwargs)
            return [] if drafter == want else [f"parsed {drafter!r} != {want!r}"]

        expect(problem, lambda: parse_drafter(payload["text"]), check)

    # ============================================================================================ CLI
    def run_cli(self, payload):
        import ssm_llm_cli as cli

        argv_desc = payload["argv"]
        work = self.scratch()
        paths = self._cli_paths(work, argv_desc)
        argv, problem, convert = cli_argv_and_oracle(argv_desc, paths, self._cli_tokenize)
        watched = work if convert else None
        before = _tree_signature(watched, exclude=paths.get("dest_path")) if watched else None
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            except BaseException as e:  # noqa: BLE001 - main must never raise
                raise Verdict("crash", f"cli.main raised {type(e).__name__}", e) from None
        stderr = err.getvalue()
        if convert:
            after = _tree_signature(watched, exclude=paths.get("dest_path"))
            if after != before:
                changed = sorted(set(before.items()) ^ set(after.items()))[:3]
                raise Verdict("unsafe", f"files outside the destination changed: {changed}")
            leftovers = (
                [p.name for p in paths["dest_path"].parent.glob(f".{paths['dest_path'].name}.*")]
                if paths.get("dest_path")
                else []
            )
            if leftovers:
                raise Verdict("silent", f"temporary siblings left behind: {leftovers}")
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if "Traceback (most recent call last)" in stderr:
            raise Verdict("crash", f"traceback on stderr; last line: {last[:200]}")
        if code not in (0, 2, 130):
            raise Verdict("crash", f"exit status {code}: {last[:200]}")
        if code == 2:
            if problem is None:
                raise Verdict("crash", f"valid argv refused: {last[:200]}")
            if not re.match(rf"^(ssm-llm|usage)[^:]*: error: .{{{MIN_MESSAGE},}}", last) and "usage:" not in stderr:
                raise Verdict("unclear", f"exit 2 without a one-line error: {last[:200]!r}")
            raise Verdict("clear", last[:200])
        if code == 0 and problem not in (None, UNKNOWN):
            raise Verdict("silent", f"exit status 0 for invalid argv ({problem}): {argv}")
        if code == 0 and convert and problem is None:
            import converters

            got = converters.load(paths["dest_path"])
            if not _same_params(got[1], converters.load(paths["source_path"])[1]) and "--dtype" not in " ".join(argv):
                raise Verdict("silent", "the converted checkpoint differs from its source")

    def _cli_tokenize(self, text: str, chat: bool, system: str | None) -> list[int]:
        tok = self._load_baseline("tokenizer", self._tokenizer)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False).input_ids
        return tok(text).input_ids

    def _cli_paths(self, work: Path, desc: dict) -> dict:
        opts = dict(desc["opts"])
        paths = {}
        model = opts.get("--model")
        if model is not None:
            paths["model"] = {
                "cli_ckpt": self.fixtures / "cli_ckpt" / "ckpt",
                "hf_dir": self.fixtures / "hf_llama",
                "missing": work / "missing",
                "not_gguf": _write(work / "weights.bin", b"nope"),
                "ckpt_no_tokenizer": self.fixtures / "ckpt_llama" / "ckpt",
                "gguf": self.fixtures / "gguf" / "tiny.gguf",
                "empty_dir": _mkdir(work / "empty"),
            }[model]
        if "SOURCE" in opts:
            src = opts["SOURCE"]
            source = work / "src"
            if src == "hf_dir":
                shutil.copytree(
                    self.fixtures / "hf_llama", source, ignore=shutil.ignore_patterns(".done", "state_dict.pt")
                )
            elif src == "gguf":
                source = work / "tiny.gguf"
                shutil.copy(self.fixtures / "gguf" / "tiny.gguf", source)
            elif src == "ckpt":
                shutil.copytree(self.fixtures / "cli_ckpt" / "ckpt", source)
            elif src == "not_gguf":
                source = _write(work / "weights.bin", b"nope")
            paths["source_path"] = source
            dest = opts["DEST"]
            if dest == "new":
                d = work / "out"
            elif dest == "nested_new":
                d = work / "a" / "b" / "out"
            elif dest == "empty":
                d = _mkdir(work / "out")
            elif dest == "unrelated":
                d = _mkdir(work / "out")
                _write(d / "notes.txt", b"precious")
            elif dest == "source":
                d = source
            elif dest == "inside_source":
                d = source / "converted"
            elif dest == "contains_source":
                d = work
            elif dest == "file":
                d = _write(work / "out.txt", b"precious")
            elif dest == "checkpoint":
                d = work / "out"
                shutil.copytree(self.fixtures / "cli_ckpt" / "ckpt", d)
            paths["dest_path"] = d
            paths["dest_kind"] = dest
        return paths


class _Evil:
    """Unpickling this object calls a function that leaves a marker (open / mkdir) or runs code (exec)."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        if self.how == "mkdir":
            return (os.mkdir, (self.marker,))
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tree_signature(root: Path, exclude: Path | None = None) -> dict:
    sig = {}
    for p in sorted(root.rglob("*")):
        if exclude is not None and (p == exclude or exclude in p.parents or p in exclude.parents):
            continue  # the destination, and the parent directories a save may create for it
        if exclude is not None and p.name.startswith(f".{exclude.name}."):
            continue  # the staging / backup siblings of the destination are checked separately
        if p.is_file():
            sig[str(p.relative_to(root))] = (p.stat().st_size, p.stat().st_mtime_ns)
        elif p.is_dir():
            sig[str(p.relative_to(root))] = "dir"
    return sig


def _same_params(a, b) -> bool:
    import jax

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    return all(
        np.asarray(x).shape == np.asarray(y).shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


def _st_header(path: Path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n]


def write_gguf(path: Path, meta, tensors):
    """Write a GGUF file: meta [(key, kind, value)] in order, tensors [(name, array, raw type name or None)]."""
    import gguf

    types = {
        "u8": gguf.GGUFValueType.UINT8,
        "u32": gguf.GGUFValueType.UINT32,
        "i32": gguf.GGUFValueType.INT32,
        "u64": gguf.GGUFValueType.UINT64,
        "i64": gguf.GGUFValueType.INT64,
        "f32": gguf.GGUFValueType.FLOAT32,
        "f64": gguf.GGUFValueType.FLOAT64,
        "bool": gguf.GGUFValueType.BOOL,
        "str": gguf.GGUFValueType.STRING,
    }
    arch = next((v for k, _, v in meta if k == "general.architecture"), "llama")
    writer = gguf.GGUFWriter(str(path), arch=str(arch))
    writer.kv_data[0].clear()
    for key, kind, value in meta:
        if kind.startswith("arr_"):
            sub = types[kind[4:]]
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub)
        else:
            writer.add_key_value(key, value, types[kind])
    for name, array, raw in tensors:
        if raw == "Q8_0" and array.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif raw == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        elif raw == "BF16":
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------------------ loader oracles


def _get(d, key, default=None):
    v = d.get(key)
    return default if v is None else v


def hf_config_problem(config, original):
    """An HF llama config.json over the fixture's weights (hidden 32, 2 layers, 4/2 heads of 8, vocab 101,
    intermediate 64, untied, no biases): the reason it must be refused, or None / UNKNOWN."""
    if not isinstance(config, dict):
        return "not an object"
    mt = config.get("model_type")
    if mt is None:
        arch = config.get("architectures")
        if not (isinstance(arch, list) and "LlamaForCausalLM" in arch):
            return "no usable model_type / architectures"
        if "MambaForCausalLM" in arch or "Mamba2ForCausalLM" in arch:
            return UNKNOWN
    elif mt not in ("llama", "mistral"):  # Mistral has Llama's tensors; Qwen2 adds q/k/v biases
        return f"model_type {mt!r} for llama weights"
    ints = {
        "vocab_size": (VOCAB, True),
        "hidden_size": (32, True),
        "intermediate_size": (64, True),
        "num_hidden_layers": (2, True),
        "num_attention_heads": (4, True),
    }
    for key, (want, _) in ints.items():
        v = config.get(key)
        if v is None:
            return f"{key} missing"
        if not int_in(v, 1):
            return f"{key}={v!r} not a positive int"
        if v != want:
            return f"{key}={v} does not match the weights"
    heads = config["num_attention_heads"]
    kv = _get(config, "num_key_value_heads", heads)
    hd = _get(config, "head_dim", config["hidden_size"] // heads)
    for key, v in (("num_key_value_heads", kv), ("head_dim", hd)):
        if not int_in(v, 1):
            return f"{key}={v!r} not a positive int"
    if kv != 2 or hd != 8:
        return "head sizes do not match the weights"
    for key in ("max_position_embeddings",):
        if config.get(key) is not None and not int_in(config[key], 1):
            return f"{key} not a positive int"
    if config.get("rms_norm_eps") is not None and not (is_real(config["rms_norm_eps"]) and config["rms_norm_eps"] > 0):
        return "rms_norm_eps not a positive number"
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        v = config.get(key)
        if v is not None and not (isinstance(v, bool) or v in (0, 1)) or (isinstance(v, float)):
            return f"{key}={v!r} not a bool"
        if v:
            return f"{key}=true does not match the weights"
    if config.get("hidden_act") not in (None, "silu", "swish"):
        return "hidden_act not silu"
    for key in ("bos_token_id",):
        v = config.get(key)
        if v is not None and not int_in(v, 0, VOCAB - 1):
            return f"{key}={v!r} not a token id"
    eos = config.get("eos_token_id")
    if eos is not None and token_ids_problem(eos, VOCAB):
        return "eos_token_id: " + token_ids_problem(eos, VOCAB)
    rope = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    for name, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            return f"{name} not an object"
    params = {**(scaling or {}), **(rope or {})}
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ("default", "linear", "llama3"):
        return f"rope_type {rtype!r}"
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is not None and not (is_real(theta) and theta > 0):
        return "rope_theta not a positive number"
    top = config.get("rope_theta")
    if top is not None and not (is_real(top) and top > 0):
        return UNKNOWN  # an invalid top-level rope_theta shadowed by rope_parameters: refusing it is fine too
    if rtype in ("linear", "llama3"):
        if not (is_real(params.get("factor")) and params["factor"] > 0):
            return "rope factor"
        if rtype == "llama3":
            return UNKNOWN
    if config.get("partial_rotary_factor") not in (None, 1.0, 1):
        return "partial_rotary_factor"
    window = config.get("sliding_window")
    if window is not None and not (is_int(window) and window == 0):
        return UNKNOWN  # a llama with a sliding_window key: reading or refusing it are both defensible
    return None


def hf_config_mismatch(config, got):
    """The fields of a loaded ModelConfig that do not equal config.json's values."""
    heads = config["num_attention_heads"]
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    eos = config.get("eos_token_id")
    want = {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": _get(config, "num_key_value_heads", heads),
        "head_dim": _get(config, "head_dim", config["hidden_size"] // heads),
        "max_position_embeddings": _get(config, "max_position_embeddings", 2048),
        "rms_norm_eps": float(_get(config, "rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(_get(config, "tie_word_embeddings", False)),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_ids": () if eos is None else tuple([eos] if is_int(eos) else eos),
        "model_type": config.get("model_type") or "llama",
    }
    broken = [f"{k}: loaded {getattr(got, k)!r}, config.json {v!r}" for k, v in want.items() if getattr(got, k) != v]
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(got.rope.theta) != float(theta if theta is not None else 10000.0):
        broken.append(f"rope theta: loaded {got.rope.theta}, config.json {theta}")
    return broken


GGUF_READ = ["llama.embedding_length", "llama.feed_forward_length", "llama.block_count", "llama.attention.head_count"]


def gguf_oracle(path: Path):
    """(problem, expected config fields) of a GGUF file, from the `gguf` package's own reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            _ = np.asarray(t.data).sum()  # the reader must reach every tensor's bytes
    except Exception as e:  # noqa: BLE001 - any refusal of the gguf reader
        return f"the gguf reader refuses it ({type(e).__name__})", None
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        return f"architecture {arch!r}", None
    if arch == "qwen2":
        return "qwen2 needs q/k/v biases this llama file lacks", None

    def f(key, default=None):
        return fields.get(f"llama.{key}", default)

    h, ff, layers, heads = f("embedding_length"), f("feed_forward_length"), f("block_count"), f("attention.head_count")
    for name, v in (
        ("embedding_length", h),
        ("feed_forward_length", ff),
        ("block_count", layers),
        ("head_count", heads),
    ):
        if v is None:
            return f"{name} missing", None
        if not int_in(v, 1):
            return f"{name}={v!r} not a positive int", None
    if layers > MAX_LAYERS:
        return f"block_count={layers} above MAX_LAYERS", None
    kv = f("attention.head_count_kv", heads)
    if not int_in(kv, 1):
        return "head_count_kv not a positive int", None
    hd = f("attention.key_length") or f("rope.dimension_count") or h // heads
    if not int_in(hd, 1):
        return "head dim not a positive int", None
    eps, theta, ctx = (
        f("attention.layer_norm_rms_epsilon", 1e-6),
        f("rope.freq_base", 10000.0),
        f("context_length", 2048),
    )
    if not (is_real(eps) and eps > 0):
        return "rms epsilon", None
    if not (is_real(theta) and theta > 0):
        return "rope freq_base", None
    if not int_in(ctx, 1):
        return "context_length", None
    scaling = f("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            return f"rope scaling {scaling!r}", None
        factor = f("rope.scaling.factor")
        if not (is_real(factor) and factor > 0):
            return "rope scaling factor", None
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    if "token_embd.weight" not in tensors:
        return "no token_embd.weight", None
    vocab = int(tensors["token_embd.weight"].shape[1]) if len(tensors["token_embd.weight"].shape) == 2 else None
    if vocab is None:
        return "token_embd.weight not 2-D", None
    if bos is not None and not int_in(bos, 0, vocab - 1):
        return "bos id", None
    if eos is not None and token_ids_problem(eos, vocab):
        return "eos id", None
    if "rope_freqs.weight" in tensors:
        return "rope_freqs.weight", None
    if heads % kv or hd % 2:
        return "head counts", None
    expected = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if "output.weight" in tensors:
        expected["output.weight"] = (vocab, h)
    for i in range(layers):
        expected.update(
            {
                f"blk.{i}.attn_norm.weight": (h,),
                f"blk.{i}.attn_q.weight": (heads * hd, h),
                f"blk.{i}.attn_k.weight": (kv * hd, h),
                f"blk.{i}.attn_v.weight": (kv * hd, h),
                f"blk.{i}.attn_output.weight": (h, heads * hd),
                f"blk.{i}.ffn_norm.weight": (h,),
                f"blk.{i}.ffn_gate.weight": (ff, h),
                f"blk.{i}.ffn_up.weight": (ff, h),
                f"blk.{i}.ffn_down.weight": (h, ff),
            }
        )
    if set(tensors) != set(expected):
        return f"tensor names differ ({sorted(set(tensors) ^ set(expected))[:3]})", None
    for name, shape in expected.items():
        if tuple(int(s) for s in reversed(tensors[name].shape)) != shape:
            return f"{name} shape", None
    want = {
        "hidden_size": h,
        "intermediate_size": ff,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": hd,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "rms_norm_eps": float(eps),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": bos,
        "eos_token_ids": () if eos is None else tuple([eos] if is_int(eos) else eos),
    }
    return None, want | {"rope_theta": float(theta)}


def gguf_mismatch(want, got):
    broken = [
        f"{k}: loaded {getattr(got, k)!r}, file {v!r}"
        for k, v in want.items()
        if k != "rope_theta" and getattr(got, k) != v
    ]
    if not math.isclose(got.rope.theta, want["rope_theta"], rel_tol=1e-6):
        broken.append(f"rope theta {got.rope.theta} != {want['rope_theta']}")
    return broken


ORBAX_BOOL_FIELDS = {"tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "use_bias", "use_conv_bias"}
ORBAX_SHAPE_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "state_size",
    "conv_kernel",
    "n_groups",
    "use_bias",
    "use_conv_bias",
    "time_step_rank",
}


def orbax_meta_problem(meta, original, model_name):
    """An edited ssm_llm_config.json over the saved params: the reason it must be refused, None or UNKNOWN."""
    if not isinstance(meta, dict) or meta.get("format_version") != 1 or not isinstance(meta.get("config"), dict):
        return "not a format-1 checkpoint config"
    if "quantized_weights" in meta:
        return "bogus quantized weights"
    config = meta["config"]
    if set(config) - set(original):
        return f"unknown keys {sorted(set(config) - set(original))}"
    for key in original:
        if key not in config:
            if key in ("family",) and model_name == "llama":
                continue  # the attention family is the default
            if key in (
                "vocab_size",
                "hidden_size",
                "num_layers",
                "intermediate_size",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "state_size",
            ):
                return f"{key} missing"
            return UNKNOWN  # a field with a default
    for key, value in config.items():
        old = original[key]
        if value == old and type(value) is type(old):
            continue
        if key in ORBAX_BOOL_FIELDS and not isinstance(value, bool):
            return f"{key}={value!r} is not a bool"
        if key in ORBAX_SHAPE_FIELDS or key == "family":
            return f"{key} changed: the params no longer match"
        if key in ("max_position_embeddings", "chunk_size"):
            if not int_in(value, 1):
                return f"{key}={value!r}"
        elif key in ("rms_norm_eps", "layer_norm_epsilon"):
            if not (is_real(value) and value > 0):
                return f"{key}={value!r}"
        elif key == "bos_token_id":
            if value is not None and not int_in(value, 0, VOCAB - 1):
                return f"{key}={value!r}"
        elif key == "eos_token_ids":
            if not isinstance(value, list) or token_ids_problem(value, VOCAB):
                return f"{key}={value!r}"
        elif key == "layer_windows":
            if not (isinstance(value, list) and len(value) == 2 and all(int_in(w, 0) for w in value)):
                return f"{key}={value!r}"
        elif key == "rope":
            if not isinstance(value, dict) or set(value) - {
                "theta",
                "rope_type",
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            }:
                return f"rope={value!r}"
            theta = value.get("theta", 10000.0)
            if not (is_real(theta) and theta > 0):
                return f"rope={value!r}"
            return UNKNOWN if set(value) != {"theta"} else None
        elif key == "model_type":
            if not isinstance(value, str):
                return f"model_type={value!r}"
            return UNKNOWN  # a free label
        else:
            return UNKNOWN
    return None


def orbax_config_mismatch(config, got):
    broken = []
    for key, value in config.items():
        if key == "family":
            continue
        have = getattr(got, key, None)
        if key == "rope":
            if float(have.theta) != float(value.get("theta", 10000.0)):
                broken.append(f"rope theta {have.theta} != {value}")
            continue
        if isinstance(have, tuple):
            have = list(have)
        if have != value or (isinstance(value, int) and not isinstance(value, bool) and isinstance(have, bool)):
            broken.append(f"{key}: loaded {have!r}, file {value!r}")
    return broken


# -------------------------------------------------------------------------------------- spec oracle


def spec_oracle(text: str, names: dict, ctor_problem, fields: dict):
    """(problem, class name, kwargs) for `name[:key=value,...]` (see the module doc of ssm_llm.option_spec:
    values are Python literals or bare words; brackets nest; a key may appear once)."""
    name, _, args = text.partition(":")
    cls = names.get(name.strip().lower())
    if cls is None:
        return f"unknown name {name!r}", None, None
    items, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return "unbalanced brackets", None, None
        if ch == "," and depth == 0:
            items.append(args[start:i])
            start = i + 1
    if depth:
        return "unbalanced brackets", None, None
    items.append(args[start:])
    kwargs = {}
    for item in (x.strip() for x in items):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in fields[cls]:
            return f"bad parameter {item!r}", None, None
        if key in kwargs:
            return f"{key} twice", None, None
        if value.isidentifier() and value not in ("None", "True", "False"):
            kwargs[key] = value
        else:
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                return f"{key}: not a literal", None, None
    problem = ctor_problem(cls, kwargs)
    return problem, cls, kwargs


# --------------------------------------------------------------------------------------- CLI oracle

_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def cli_argv_and_oracle(desc, paths, tokenize):
    """(argv, problem, is_convert) for a CLI payload."""
    command, opts, form = desc["command"], desc["opts"], desc["form"]
    argv = [command] if command else []
    problem = None
    if command in ("", "bogus"):
        problem = "no or unknown command"
    if command == "--help":
        return ["--help"], None, False
    values = {}
    positional = []
    for flag, value in opts:
        if flag == "SOURCE":
            positional.append(str(paths["source_path"]))
            continue
        if flag == "DEST":
            positional.append(str(paths["dest_path"]))
            continue
        if flag == "--model":
            value = str(paths["model"])
        if value is None:
            argv.append(flag)
            values[flag] = True
            continue
        if form == "equals":
            argv.append(f"{flag}={value}")
        else:
            argv += [flag, value]
            if value.startswith("-") and not _NEGATIVE_NUMBER.match(value):
                problem = problem or f"{flag} {value!r}: argparse reads a value starting with '-' as an option"
        values[flag] = value
    argv += positional
    if "--bogus-flag" in values:
        problem = problem or "unknown flag"
    if problem or command != "generate" and command != "convert":
        return argv, problem, command == "convert"
    if command == "convert":
        return argv, problem or convert_problem(values, paths), True
    return argv, problem or generate_cli_problem(values, paths, tokenize), False


def convert_problem(values, paths):
    dtype = values.get("--dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        return "--dtype not a choice"
    source, dest, kind = paths["source_path"], paths["dest_path"], paths["dest_kind"]
    if kind in ("source", "inside_source", "contains_source"):
        return "destination overlaps the source"
    if kind in ("unrelated", "file"):
        return "destination holds other files"
    if kind == "checkpoint" and "--overwrite" not in values:
        return "destination holds a checkpoint and no --overwrite"
    if not source.exists():
        return "missing source"
    if source.name == "weights.bin":
        return "source not a checkpoint"
    del dest
    return None


def generate_cli_problem(values, paths, tokenize):
    if "--prompt" not in values:
        return "--prompt missing"
    numbers = {
        "--max-new-tokens": (int, 128),
        "--top-k": (int, None),
        "--seed": (int, 0),
        "--temperature": (float, 0.0),
        "--top-p": (float, 1.0),
        "--min-p": (float, 0.0),
    }
    parsed = {}
    for flag, (kind, default) in numbers.items():
        if flag not in values:
            parsed[flag] = default
            continue
        try:
            parsed[flag] = kind(values[flag])
        except ValueError:
            return f"{flag} {values[flag]!r} not {'an int' if kind is int else 'a float'}"
    if "--system" in values and "--chat" not in values:
        return "--system without --chat"
    policy = drafter = None
    if "--kv-compression" in values:
        problem, cls, kwargs = spec_oracle(
            values["--kv-compression"],
            {n.lower(): n for n in POLICY_FIELDS},
            policy_ctor_problem,
            {n: set(s["required"]) | set(s["defaults"]) for n, s in POLICY_FIELDS.items()},
        )
        if problem:
            return "--kv-compression: " + problem
        policy = (cls, kwargs)
    if "--speculative" in values:
        problem, cls, kwargs = spec_oracle(
            values["--speculative"],
            {"prompt_lookup": "PromptLookup", "token_recycling": "TokenRecycling"},
            lambda n, k: drafter_ctor_problem(n, k, None, None),
            {"PromptLookup": {"num_tokens", "max_ngram", "min_ngram"}, "TokenRecycling": {"candidates", "template"}},
        )
        if problem:
            return "--speculative: " + problem
        drafter = (cls, kwargs)
    gen = {
        "max_new_tokens": parsed["--max-new-tokens"],
        "temperature": parsed["--temperature"],
        "top_k": parsed["--top-k"],
        "top_p": parsed["--top-p"],
        "min_p": parsed["--min-p"],
        "seed": parsed["--seed"],
    }
    problem = gen_config_problem(gen, True, True)
    if policy and drafter:
        problem = problem or "kv_compression and speculative together"
    if problem:
        return problem
    model = paths["model"]
    if not model.exists():
        return "--model missing"
    if model.name in ("weights.bin", "empty"):
        return "--model not a checkpoint"
    if model.name == "tiny.gguf":
        return "the GGUF has no tokenizer"
    if model.parent.name == "ckpt_llama":
        return "the checkpoint has no tokenizer"
    ids = tokenize(values["--prompt"], "--chat" in values, values.get("--system"))
    if not ids:
        return "the prompt tokenizes to nothing"
    longest, mnt = len(ids), gen["max_new_tokens"]
    unbounded = policy is not None and policy_unbounded(*policy)
    if longest > CONTEXT or (longest + mnt > CONTEXT and not unbounded):
        return "past the model's context"
    if policy:
        padded = -(-longest // 16) * 16
        problem = policy_model_problem(policy[0], policy[1], [longest], padded)
        if problem:
            return problem
    if drafter:
        problem = drafter_model_problem(drafter[0], drafter[1], None)
        if problem:
            return problem
    if mnt > 64 or (policy and mnt > 16):
        return UNKNOWN  # valid, but too long to be worth it: kept only for its argument checks
    return None


# ========================================================================================== processes


def worker_main(conn, root: str, memory_limit_gb: float):
    """The worker process: receives (kind, target, payload), answers with a record. Its address space is
    capped, so that an input asking for absurd memory fails in the worker instead of exhausting the machine."""
    if memory_limit_gb > 0:
        import resource

        limit = int(memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log = open(Path(root) / f"worker-{os.getpid()}.log", "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    worker = Worker(Path(root))
    done = 0
    while True:
        try:
            kind, target, payload = conn.recv()
        except EOFError:
            return
        if kind == "prepare":
            conn.send(worker.prepare(target))
            continue
        record = worker.run(target, payload)
        conn.send(record)
        done += 1
        if done % 40 == 0:
            import jax

            jax.clear_caches()  # a long-lived process compiling thousands of programs: see tests/conftest.py


class Pool:
    """One worker process that is killed and replaced when an example passes its time limit."""

    def __init__(self, root: Path, memory_limit_gb: float):
        self.root, self.memory_limit_gb = root, memory_limit_gb
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = None
        self.conn = None
        self.prepared = set()
        self.restarts = 0
        self.examples = 0

    def start(self):
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(
            target=worker_main, args=(child, str(self.root), self.memory_limit_gb), daemon=True
        )
        self.proc.start()
        child.close()
        self.conn = parent
        self.prepared = set()
        self.examples = 0

    def stop(self, graceful: bool = False):
        if graceful and self.proc is not None and self.proc.is_alive():
            self.conn.close()  # the worker's recv() sees EOF and returns
            self.proc.join(15)
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(5)
        self.proc = None

    def _ask(self, message, limit: float):
        if self.proc is None or not self.proc.is_alive():
            if self.proc is not None:
                self.restarts += 1
            self.start()
        self.conn.send(message)
        if not self.conn.poll(max(0.0, limit)):
            return "timeout", None
        try:
            return "done", self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            code = self.proc.exitcode if self.proc is not None else None
            return "died", code

    def prepare(self, target: str, limit: float = 900.0):
        if self.proc is not None and self.proc.is_alive() and target in self.prepared:
            return None
        status, value = self._ask(("prepare", target, None), limit)
        if status != "done":
            self.stop()
            raise RuntimeError(f"preparing {target} failed ({status}, {value})")
        self.prepared.add(target)
        return value

    def run(self, target: str, payload: dict, timeout: float, deadline: float) -> dict:
        if self.examples >= 250:  # a fresh process now and then keeps memory and XLA state bounded
            self.stop()
        self.prepare(target)
        start = time.monotonic()
        limit = min(timeout, max(deadline - start, 0.0) + 10.0)
        status, value = self._ask(("example", target, payload), limit)
        elapsed = time.monotonic() - start
        self.examples += 1
        if status == "done":
            return value
        self.stop()
        self.restarts += 1
        if status == "timeout":
            if elapsed < timeout - 1:
                return {"outcome": "cut", "detail": "stopped at the end of the budget", "seconds": round(elapsed, 1)}
            return {"outcome": "hang", "detail": f"no result after {timeout:.0f} s", "seconds": round(elapsed, 1)}
        signal = f" (signal {-value})" if isinstance(value, int) and value < 0 else f" (exit {value})"
        return {
            "outcome": "crash",
            "detail": f"the worker process died{signal}",
            "seconds": round(elapsed, 1),
            "exception": "WorkerDied",
        }


# ================================================================================================ driver


class _Stop(Exception):
    pass


def machine_info() -> dict:
    import importlib.metadata

    from ssm_llm.cpu_features import host_cpu

    def version(name):
        return importlib.metadata.version(name)

    return {
        **host_cpu().as_json(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": version("jax"),
        "hypothesis": version("hypothesis"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "gguf": version("gguf"),
    }


def code_version() -> dict:
    """The commit fuzzed, and whether the library had uncommitted changes."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_library_changes": bool(git("status", "--porcelain", "--", *OWN_PACKAGES)),
    }


def _repr(payload, limit: int = 400) -> str:
    text = repr(payload)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=1200.0,
        help="wall-clock budget of the whole run, fixture building included (default 1200)",
    )
    parser.add_argument(
        "--max-examples-per-target",
        type=int,
        default=None,
        help="stop a target after this many examples (default: only the budget stops it)",
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated targets (default: all): {', '.join(TARGETS)}"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="hypothesis seed")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-example time limit in seconds (a hang)")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=8.0,
        help="address-space limit of the worker process (0: none); default 8",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_inputs.json", help="the JSON result")
    parser.add_argument("--keep-sandbox", action="store_true", help="keep the temporary directory (debugging)")
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        help="also write every example (target, input, outcome, exception) to this JSON-lines file",
    )
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.budget_seconds <= 0 or args.timeout <= 0 or (args.max_examples_per_target or 1) < 1:
        parser.error("--budget-seconds, --timeout and --max-examples-per-target must be positive")

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from tqdm.auto import tqdm

    start = time.monotonic()
    deadline = start + args.budget_seconds
    sandbox = Path(tempfile.mkdtemp(prefix="fuzz_inputs-"))
    os.environ["SSM_LLM_CACHE"] = str(sandbox / "cache")  # tokenizer caches stay in the sandbox
    pool = Pool(sandbox, args.memory_limit_gb)
    log = args.log.open("w") if args.log else None
    all_strategies = strategies()
    counts = {t: Counter() for t in targets}
    findings = defaultdict(list)
    seen = set()
    seconds = Counter()
    setup = {}
    cut = 0
    print(
        f"fuzzing {len(targets)} targets for {args.budget_seconds:.0f} s (per-example timeout {args.timeout:.0f} s); "
        f"sandbox {sandbox}"
    )

    def make_fuzz(target, strategy, target_deadline, bar):
        @settings(
            max_examples=args.max_examples_per_target or 10**6,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @hypothesis_seed(args.seed + targets.index(target))
        @given(strategy)
        def fuzz(payload):
            nonlocal cut
            now = time.monotonic()
            if now >= deadline or (now >= target_deadline and sum(counts[target].values())):
                raise _Stop  # every target gets at least one example while the budget lasts
            record = pool.run(target, payload, args.timeout, max(target_deadline, min(deadline, now + args.timeout)))
            outcome = record["outcome"]
            seconds[target] += record.get("seconds", 0.0)
            if outcome == "cut":
                cut += 1
                raise _Stop
            counts[target][outcome] += 1
            if log is not None:
                log.write(
                    json.dumps(
                        {
                            "target": target,
                            "input": _repr(payload, 600),
                            **{k: v for k, v in record.items() if k != "traceback"},
                        },
                        default=str,
                    )
                    + "\n"
                )
            bar.update(1)
            bar.set_postfix({k: v for k, v in counts[target].items() if v}, refresh=False)
            if outcome in BAD_OUTCOMES:
                key = (target, outcome, record.get("exception"), (record.get("message") or record["detail"])[:120])
                if key not in seen and len(findings[outcome]) < FINDINGS_PER_OUTCOME:
                    seen.add(key)
                    findings[outcome].append(
                        {
                            "target": target,
                            "input": _repr(payload),
                            **{
                                k: record[k]
                                for k in ("detail", "exception", "message", "frame", "traceback")
                                if record.get(k)
                            },
                        }
                    )

        return fuzz

    try:
        for i, target in enumerate(targets):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                setup[target] = pool.prepare(target)
            except RuntimeError as e:
                counts[target]["crash"] += 1
                findings["crash"].append({"target": target, "input": "(fixture preparation)", "detail": str(e)})
                continue
            # This target's share of what is left once its fixtures exist (a target that stops early, at
            # --max-examples-per-target, leaves its time to the next ones).
            weights = [TARGETS[t] for t in targets[i:]]
            now = time.monotonic()
            target_deadline = min(deadline, now + max(deadline - now, 0.0) * TARGETS[target] / sum(weights))
            bar = tqdm(total=args.max_examples_per_target, desc=f"{target:<21}", leave=True, mininterval=1.0)

            fuzz = make_fuzz(target, all_strategies[target], target_deadline, bar)
            try:
                fuzz()
            except _Stop:
                pass
            except BaseException as e:
                if not _only_stops(e):
                    raise
            bar.close()
    finally:
        pool.stop(graceful=True)
        if log is not None:
            log.close()
        if not args.keep_sandbox:
            shutil.rmtree(sandbox, ignore_errors=True)

    wall = time.monotonic() - start
    totals = Counter()
    for c in counts.values():
        totals.update(c)
    result = {
        "script": "experiments/fuzz_inputs.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seed": args.seed,
        "machine": machine_info() | {"jax_backend": next((s["backend"] for s in setup.values() if s), "cpu")},
        "code": code_version(),
        "budget_seconds": args.budget_seconds,
        "wall_seconds": round(wall, 1),
        "per_example_timeout_s": args.timeout,
        "outcomes": list(OUTCOMES),
        "targets": targets,
        "counts": {t: {o: counts[t][o] for o in OUTCOMES} for t in targets},
        "totals": {o: totals[o] for o in OUTCOMES},
        "examples": sum(totals.values()),
        "seconds_per_target": {t: round(seconds[t], 1) for t in targets},
        "cut_at_budget_end": cut,
        "worker_restarts": pool.restarts,
        "findings": {o: findings[o] for o in BAD_OUTCOMES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))

    print(
        f"\n{result['machine']['cpu']} ({result['machine']['cores']} cores), jax {result['machine']['jax']}; "
        f"{wall:.0f} s wall of a {args.budget_seconds:.0f} s budget; results: {args.out}"
    )
    print(f"{'target':<22}" + "".join(f"{o:>8}" for o in OUTCOMES) + f"{'total':>8}")
    for t in targets:
        row = counts[t]
        print(f"{t:<22}" + "".join(f"{row[o]:>8}" for o in OUTCOMES) + f"{sum(row.values()):>8}")
    print(f"{'total':<22}" + "".join(f"{totals[o]:>8}" for o in OUTCOMES) + f"{sum(totals.values()):>8}")
    return result


def _only_stops(e: BaseException) -> bool:
    if isinstance(e, _Stop):
        return True
    inner = getattr(e, "exceptions", None)
    if inner:
        return all(_only_stops(x) for x in inner)
    cause = e.__cause__ or e.__context__
    return cause is not None and _only_stops(cause)


if __name__ == "__main__":
    main()
