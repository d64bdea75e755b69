"""Quamba / Quamba2 post-training quantization of our trained Mamba-2 and Mamba-1: held-out perplexity,
weight and cache bytes, quantization time and CPU decode speed, with an ablation of every ingredient.

Models: the exports of `experiments/train_mamba2.py` (`<--out>/model`, default
$SSM_LLM_CACHE/train/<family>-<preset>/model), or with --tiny-random random-weight tiny models (smoke tests).
Data: the text corpus of `text_corpus` (the SmolLM2 tokenizer). Calibration: --calib-seqs windows of
--calib-len tokens at random positions (seed 0) of the TRAIN split; evaluation: --eval-windows windows
of --seq-len tokens spread evenly over the held-out EVAL split, scored through `ssm_llm.forward`
(--eval-batch windows per call). The split is by document and does not depend on --max-chars, so the
evaluation text is held out from every training run of `train_mamba2.py`.

Rows per family (fp32 is the float model itself; every other row is `quantize_model` with a scheme):
  naive W8A8 / W4A8 / W4A16    per-tensor min-max activation scales, round-to-nearest weights, no rotation
  quamba2 (Mamba-2) / quamba (Mamba-1) W8A8 / W4A8 / W4A16: the full recipe
  ablation: naive + each single ingredient, and full minus each ingredient, at every bit pair.
    Mamba-2 ingredients: hadamard, cluster (sort-and-cluster x), bc_groups (per-group B/C), gptq.
    Mamba-1 ingredients: hadamard, percentile (the observer of x and the SSM state), gptq.
  A row whose scheme quantizes exactly like an earlier one is not run again but listed under
  "aliases": at W4A16 activations stay float, so cluster / bc_groups / percentile change nothing and
  "full minus gptq" is "naive + hadamard" — W4A16's ablation is hadamard and gptq alone.
Per row: perplexity and its ratio to fp32; weight bytes (every param leaf, a quantized weight counted
as its int values + scales; also the quantized linears alone, and the float embedding + lm_head, which
the quantized models keep in float and untie); cache bytes at batch 1 (`SSMCache.nbytes`);
`quantize_model` wall time (calibration included); CPU decode tokens/s at batch 1: `ssm_llm.generate`,
greedy, --decode-steps new tokens after a --prompt-len-token prompt, timed by generate's own
`decode_seconds` (its jitted while_loop: --decode-steps - 1 one-token forwards), after an untimed
compiling call, every row timed in interleaved rounds in this run, median over --decode-repeats,
as a ratio to fp32's. All paths use impl="auto" (on CPU: the XLA reference of the integer matmul).
Targets (Quamba2 paper): W8A8 within 1% of fp32's perplexity, W4A8 within 3%; and each ingredient
lowers naive's perplexity when added and raises the full recipe's when removed.
Writes experiments/results/quamba_eval.json (+ .png: perplexity ratio bars per row and family) and
prints a table last.

    python experiments/train_mamba2.py --family mamba2 && python experiments/train_mamba2.py --family mamba1
    python experiments/quamba_eval.py                                     # both families, every row
    python experiments/quamba_eval.py --families mamba2 --rows 'naive W8A8' 'quamba2 W8A8*'
    python experiments/quamba_eval.py --quick        # the tiny trained presets, small sizes: *_quick.json
    python experiments/quamba_eval.py --tiny-random --families mamba2 --calib-seqs 2 --calib-len 32 \\
        --eval-windows 2 --seq-len 32 --decode-steps 4    # random weights, no training (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import text_corpus  # noqa: E402
import train_mamba2  # noqa: E402
from bench_runners import machine_info, tree_bytes  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import ssm_llm  # noqa: E402
from converters.cache_dir import cache_root  # noqa: E402
from converters.checkpoint import is_checkpoint, load_checkpoint  # noqa: E402
from converters.tokenizer import load_tokenizer  # noqa: E402
from pallas_kernels.quantized_matmul import QuantizedWeight  # noqa: E402
from ssm_llm.models.mamba_lm import init_params  # noqa: E402
from ssm_llm.quant import QuantScheme, quantize_model  # noqa: E402
from ssm_llm.quant.quamba import linear_names  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0
FAMILIES = ("mamba2", "mamba1")
CONFIG_CLASS = {"mamba2": ssm_llm.Mamba2Config, "mamba1": ssm_llm.MambaConfig}
FULL_RECIPE = {"mamba2": ("quamba2", QuantScheme.quamba2), "mamba1": ("quamba", QuantScheme.quamba)}
INGREDIENTS = {"mamba2": ("hadamard", "cluster", "bc_groups", "gptq"), "mamba1": ("hadamard", "percentile", "gptq")}
BITS = ("W8A8", "W4A8", "W4A16")
TARGETS = {"W8A8": 0.01, "W4A8": 0.03}  # allowed relative perplexity increase over fp32 (Quamba2 paper)
# Sizes of a full run and of --quick; a flag given on the command line wins over both.
SIZES = {
    "full": dict(calib_seqs=32, calib_len=512, eval_windows=32, seq_len=512, decode_steps=64, decode_repeats=3),
    "quick": dict(calib_seqs=8, calib_len=128, eval_windows=8, seq_len=128, decode_steps=16, decode_repeats=2),
}


# ---------------------------------------------------------------- the rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One evaluated model. kind: "fp32", "naive", "full", "naive+" (naive plus `ingredient`) or
    "full-" (the full recipe minus `ingredient`); scheme None for fp32."""

    name: str
    kind: str
    bits: str | None = None
    ingredient: str | None = None
    scheme: QuantScheme | None = None


def toggled(scheme: QuantScheme, ingredient: str, on: bool) -> QuantScheme:
    """`scheme` with one ingredient switched on or off ("percentile": the observer, else a bool field)."""
    if ingredient == "percentile":
        return dataclasses.replace(scheme, observer="percentile" if on else "minmax")
    return dataclasses.replace(scheme, **{ingredient: on})


def effective(scheme: QuantScheme | None) -> QuantScheme | None:
    """The scheme with the fields that cannot change its result reset: without 8-bit activations, the
    activation-only options (cluster, bc_groups, observer, state codes) are unused by `quantize_model`."""
    if scheme is None or scheme.quantizes_acts:
        return scheme
    default = QuantScheme()
    return dataclasses.replace(
        scheme,
        cluster=False,
        bc_groups=False,
        observer="minmax",
        percentile_alpha=default.percentile_alpha,
        quantize_state=default.quantize_state,
        head_groups=default.head_groups,
        dim_groups=default.dim_groups,
    )


def family_rows(family: str) -> tuple[list[Row], dict[str, str]]:
    """Every row of `family` (see the module docstring), and {alias: row} for the candidate rows that
    quantize exactly like an earlier row (so they are not run twice)."""
    full_name, full = FULL_RECIPE[family]
    candidates = [Row("fp32", "fp32")]
    for b in BITS:  # grouped by bit pair: naive, full, then the ablation
        candidates += [
            Row(f"naive {b}", "naive", b, scheme=QuantScheme.naive(b)),
            Row(f"{full_name} {b}", "full", b, scheme=full(b)),
        ]
        candidates += [
            Row(f"naive {b} +{i}", "naive+", b, i, toggled(QuantScheme.naive(b), i, True)) for i in INGREDIENTS[family]
        ]
        candidates += [
            Row(f"{full_name} {b} -{i}", "full-", b, i, toggled(full(b), i, False)) for i in INGREDIENTS[family]
        ]
    rows, aliases, seen = [], {}, {}
    for row in candidates:
        key = effective(row.scheme)
        if key in seen:
            aliases[row.name] = seen[key]
        else:
            seen[key] = row.name
            rows.append(row)
    return rows, aliases


def matches(family: str, name: str, pattern: str) -> bool:
    """Whether row `name` of `family` matches `pattern`: an fnmatch pattern (case-insensitive), optionally
    prefixed "FAMILY:" to apply to that family only (the naive rows of both families share names)."""
    scope, sep, rest = pattern.partition(":")
    if sep and scope in FAMILIES:
        if scope != family:
            return False
        pattern = rest
    return fnmatch.fnmatch(name.lower(), pattern.lower())


def select_rows(family: str, rows: list[Row], aliases: dict[str, str], patterns: list[str] | None) -> list[Row]:
    """fp32 plus the rows matching one of `patterns` (all rows if None); a matching alias selects its row."""
    if not patterns:
        return rows
    names = [r.name for r in rows] + list(aliases)
    wanted = {n for n in names if any(matches(family, n, p) for p in patterns)}
    wanted |= {aliases[n] for n in wanted if n in aliases}
    return [r for r in rows if r.name == "fp32" or r.name in wanted]


# ---------------------------------------------------------------- models


def default_model_dir(family: str, preset: str, root: Path | None = None) -> Path:
    """Where `train_mamba2.py --family F --preset P [--out root/F-P]` exports its model."""
    return (root if root is not None else cache_root() / "train") / f"{family}-{preset}" / "model"


def resolve_model_dirs(entries: list[str] | None, families: list[str], preset: str) -> dict[str, Path]:
    """--model-dir entries: "FAMILY=DIR" (that family's exported model) or "ROOT" (a folder holding
    <family>-<preset>/model for every family, like train_mamba2.py's default $SSM_LLM_CACHE/train)."""
    root, per_family = None, {}
    for entry in entries or []:
        family, sep, path = entry.partition("=")
        if sep and family in FAMILIES:
            per_family[family] = Path(path)
        elif sep:
            raise ValueError(f"--model-dir {entry!r}: unknown family {family!r}; expected one of {FAMILIES}")
        else:
            root = Path(entry)
    return {f: per_family.get(f, default_model_dir(f, preset, root)) for f in families}


def missing_model_message(family: str, preset: str, directory: Path) -> str:
    """The error for a family without a trained model: where it was looked for and how to train it."""
    command = f"python experiments/train_mamba2.py --family {family} --preset {preset}"
    then = ""
    if directory.name != "model":
        command += f" --out {directory}"
        then = f"\nthen pass --model-dir {family}={directory / 'model'} (the script exports to <--out>/model)"
    elif directory != default_model_dir(family, preset):
        command += f" --out {directory.parent}"
    duration = " (~25-30 min on 2 cores)" if preset == "small" else ""
    return (
        f"no trained {family} model at {directory} (no exported checkpoint there). Train it first"
        f"{duration}:\n  {command}{then}"
    )


def load_family(family: str, directory: Path | None, tokenizer, separator: int):
    """(config, params, description) of `family`: the exported model in `directory`, or with
    directory None a random-weight model of train_mamba2's tiny preset."""
    if directory is None:
        config = train_mamba2.model_config(family, "tiny", len(tokenizer), tokenizer.bos_token_id, separator)
        return config, init_params(config, jax.random.PRNGKey(SEED)), "tiny random weights (seed 0)"
    config, params = load_checkpoint(directory)
    if not isinstance(config, CONFIG_CLASS[family]):
        raise ValueError(
            f"{directory} holds a {type(config).__name__}, not a {family} model "
            f"({CONFIG_CLASS[family].__name__}); check --model-dir"
        )
    return config, ssm_llm.stack_layers(params), str(directory)


# ---------------------------------------------------------------- measurements


def weight_bytes(params: dict, config) -> dict:
    """total: every param; linears: the linears Quamba quantizes (float in fp32); embed_and_lm_head:
    the float embedding and (untied in the quantized models) lm_head; other: norms, conv, SSM params,
    activation scales."""
    base = getattr(config, "base", config)
    linears = tree_bytes([params["layers"][name] for name in linear_names(base)])
    head = tree_bytes(params["embed"]) + tree_bytes(params.get("lm_head"))
    total = tree_bytes(params)
    return {"total": total, "linears": linears, "embed_and_lm_head": head, "other": total - linears - head}


@functools.partial(jax.jit, static_argnames=("config",))
def _nll_sums(params, config, windows):
    """Summed next-token NLL per row of `windows: [B, T + 1]`, through `ssm_llm.forward` from empty states."""
    tokens, targets = windows[:, :-1], windows[:, 1:]
    logits, _ = ssm_llm.forward(params, config, tokens, ssm_llm.init_cache(config, *tokens.shape))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(axis=1)


def mean_nll(params, config, windows: np.ndarray, batch: int) -> float:
    """Mean NLL over every target of `windows: [n, T + 1]`, `batch` windows per call (the last call is
    padded with repeats of its first window, so one compiled shape serves all)."""
    sums = []
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
        sums.append(np.asarray(_nll_sums(params, config, jnp.asarray(padded)))[: len(chunk)])
    return float(np.concatenate(sums).sum() / (windows.shape[0] * (windows.shape[1] - 1)))


def decode_once(params, config, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """One greedy `generate` of `steps` tokens (no EOS stop): (its decode_seconds, the tokens)."""
    out = ssm_llm.generate(params, config, [prompt], ssm_llm.GenerationConfig(max_new_tokens=steps, eos_token_ids=()))
    return out.decode_seconds, out.tokens[0]


def matching_prefix(a: list[int], b: list[int]) -> float:
    """Fraction of positions before the first difference of two equal-length token lists."""
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    return k / len(a)


def check_weights(row: Row, params: dict, config) -> None:
    """Every linear of a row with N-bit weights must be an N-bit QuantizedWeight, so that a float
    fallback is never reported as a quantized model."""
    bits = row.scheme.weight_bits
    for name in linear_names(config.base) if bits < 16 else ():
        w = params["layers"][name]
        if not isinstance(w, QuantizedWeight) or w.bits != bits:
            got = f"{w.bits}-bit weights" if isinstance(w, QuantizedWeight) else f"a float {type(w).__name__}"
            raise RuntimeError(
                f"row {row.name!r}: quantize_model returned {name} as {got}, expected {bits}-bit "
                f"QuantizedWeight (scheme {row.scheme})"
            )


def evaluate_row(row: Row, params, config, calibration, windows, prompt, args) -> tuple[dict, tuple]:
    """Quantize (unless fp32), then perplexity, bytes and one untimed (compiling) decode. Returns the
    row's results and the (params, config) to time."""
    quantize_s = 0.0
    if row.scheme is not None:
        start = time.perf_counter()
        params, config = quantize_model(
            params, config, calibration, row.scheme, batch_size=args.eval_batch, progress=False
        )
        jax.block_until_ready(params)
        quantize_s = time.perf_counter() - start
        check_weights(row, params, config)
    start = time.perf_counter()
    nll = mean_nll(params, config, windows, args.eval_batch)
    eval_s = time.perf_counter() - start
    _, tokens = decode_once(params, config, prompt, args.decode_steps)
    result = {
        "kind": row.kind,
        "bits": row.bits,
        "ingredient": row.ingredient,
        "scheme": dataclasses.asdict(row.scheme) if row.scheme is not None else None,
        "mean_nll": nll,
        "perplexity": math.exp(nll),
        "weight_bytes": weight_bytes(params, config),
        "cache_bytes_batch1": int(ssm_llm.init_cache(config, 1, 1).nbytes()),
        "quantize_s": quantize_s,
        "eval_s_incl_compile": eval_s,
        "greedy_tokens": tokens,
    }
    return result, (params, config)


def time_decode(models: dict, prompt: list[int], steps: int, repeats: int) -> dict:
    """Decode seconds of every model, in `repeats` interleaved rounds (order rotating by round)."""
    names = list(models)
    times = {name: [] for name in names}
    for rep in tqdm(range(repeats), desc="decode speed", leave=False):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(decode_once(*models[name], prompt, steps)[0])
    return times


def run_family(family: str, directory: Path | None, rows: list[Row], data: dict, tokenizer, args) -> dict:
    """Every measurement of `rows` on one family's model."""
    config, params, source = load_family(family, directory, tokenizer, data["separator"])
    out = {}
    models = {}
    bar = tqdm(rows, desc=family)
    for row in bar:
        bar.set_postfix_str(row.name)
        out[row.name], models[row.name] = evaluate_row(
            row, params, config, data["calibration"], data["windows"], data["prompt"], args
        )
    times = time_decode(models, data["prompt"], args.decode_steps, args.decode_repeats)
    del models
    fp32 = out["fp32"]
    for name, result in out.items():
        seconds = statistics.median(times[name])
        result["decode"] = {
            "tok_s": (args.decode_steps - 1) / seconds,
            "decode_seconds_median": seconds,
            "decode_seconds": times[name],
        }
        result["ppl_ratio"] = result["perplexity"] / fp32["perplexity"]
        result["linears_bytes_ratio"] = result["weight_bytes"]["linears"] / fp32["weight_bytes"]["linears"]
        result["cache_bytes_ratio"] = result["cache_bytes_batch1"] / fp32["cache_bytes_batch1"]
        result["greedy_prefix_match_fp32"] = matching_prefix(result["greedy_tokens"], fp32["greedy_tokens"])
    for result in out.values():
        result["decode"]["ratio_to_fp32"] = result["decode"]["tok_s"] / fp32["decode"]["tok_s"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    notes = []
    if isinstance(config, ssm_llm.Mamba2Config) and config.n_groups == 1:
        notes.append(
            "bc_groups: the model has a single B/C state group, so per-group B and C scales equal the "
            "per-tensor ones; only the conv input gets separate x / B / C scales"
        )
    return {
        "model": {"source": source, "config": config.to_dict(), "parameters": int(n_params)},
        "rows": out,
        "notes": notes,
    }


# ---------------------------------------------------------------- verdicts


def targets(family: str, rows: dict) -> dict:
    """Whether the full recipe's W8A8 / W4A8 perplexity is within the paper's margin of fp32's."""
    full_name = FULL_RECIPE[family][0]
    out = {}
    for bits, margin in TARGETS.items():
        name = f"{full_name} {bits}"
        ratio = rows[name]["ppl_ratio"] if name in rows else None
        out[f"{bits} within {margin:.0%}"] = {
            "row": name,
            "ppl_ratio": ratio,
            "max_ratio": 1 + margin,
            "holds": None if ratio is None else bool(ratio <= 1 + margin),
        }
    return out


def ingredient_effects(family: str, rows: dict) -> dict:
    """Per ingredient and bit pair: naive vs naive + it, and full vs full minus it (rows looked up by
    the scheme they quantize with, so aliases count); None where a row was not run, "not applicable"
    where the ingredient changes nothing at that bit pair."""
    full = FULL_RECIPE[family][1]
    by_scheme = {effective(QuantScheme(**r["scheme"])): name for name, r in rows.items() if r["scheme"] is not None}

    def ppl(scheme):
        name = by_scheme.get(effective(scheme))
        return name, (rows[name]["perplexity"] if name else None)

    out = {}
    for ingredient in INGREDIENTS[family]:
        out[ingredient] = {}
        for bits in BITS:
            naive, full_scheme = QuantScheme.naive(bits), full(bits)
            plus, minus = toggled(naive, ingredient, True), toggled(full_scheme, ingredient, False)
            if effective(plus) == effective(naive):
                out[ingredient][bits] = "not applicable (activations stay float)"
                continue
            (_, n_ppl), (p_name, p_ppl) = ppl(naive), ppl(plus)
            (_, f_ppl), (m_name, m_ppl) = ppl(full_scheme), ppl(minus)
            out[ingredient][bits] = {
                "naive": n_ppl,
                "naive_plus": p_ppl,
                "naive_plus_row": p_name,
                "adding_lowers_ppl": None if None in (n_ppl, p_ppl) else bool(p_ppl < n_ppl),
                "full": f_ppl,
                "full_minus": m_ppl,
                "full_minus_row": m_name,
                "removing_raises_ppl": None if None in (f_ppl, m_ppl) else bool(m_ppl > f_ppl),
            }
    return out


# ---------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--preset",
        choices=tuple(train_mamba2.PRESETS),
        default=None,
        help="which trained preset to load (default small; tiny with --quick)",
    )
    parser.add_argument(
        "--model-dir",
        nargs="+",
        default=None,
        metavar="[FAMILY=]DIR",
        help="FAMILY=DIR: that family's exported model (train_mamba2.py's <--out>/model); "
        "DIR: a root holding <family>-<preset>/model (default $SSM_LLM_CACHE/train)",
    )
    parser.add_argument(
        "--tiny-random",
        action="store_true",
        help="random-weight models of train_mamba2's tiny preset instead of trained ones "
        "(smoke tests; perplexities near the vocabulary size say nothing)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny trained preset and small sizes ("
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in SIZES["quick"].items())
        + "); writes "
        "quamba_eval_quick.json so real results are never overwritten",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="only the rows whose name matches a pattern (fnmatch, case-insensitive, e.g. "
        "'naive W8A8' 'quamba2 W4A8*'; 'mamba1:naive*' for one family only); fp32 is "
        "always run",
    )
    parser.add_argument("--calib-seqs", type=int, default=None, help="calibration windows (default 32)")
    parser.add_argument("--calib-len", type=int, default=None, help="tokens per calibration window (default 512)")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows scored (default 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per held-out window (default 512)")
    parser.add_argument("--eval-batch", type=int, default=8, help="windows per forward (and per calibration call)")
    parser.add_argument("--decode-steps", type=int, default=None, help="greedy tokens per timed decode (default 64)")
    parser.add_argument("--decode-repeats", type=int, default=None, help="timed decode rounds (default 3)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before the timed decode")
    parser.add_argument(
        "--corpus",
        choices=("all", "pydoc"),
        default="all",
        help="all: Python reference + Vim manuals; pydoc: the Python reference only",
    )
    parser.add_argument("--max-chars", type=int, default=None, help="use only the first documents, this many chars")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default results/quamba_eval.json; _quick with --quick, _tiny_random "
        "with --tiny-random); the PNG goes beside it",
    )
    args = parser.parse_args(argv)
    for name, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("calib_seqs", "calib_len", "eval_windows", "seq_len", "eval_batch", "decode_repeats", "prompt_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.decode_steps < 2:
        parser.error(f"--decode-steps must be >= 2 (the first token comes from the prefill), got {args.decode_steps}")
    if args.preset is None:
        args.preset = "tiny" if args.quick else "small"
    if args.tiny_random and args.model_dir:
        parser.error("--tiny-random builds random models: it takes no --model-dir")
    try:
        args.model_dirs = (
            {f: None for f in args.families}
            if args.tiny_random
            else resolve_model_dirs(args.model_dir, args.families, args.preset)
        )
    except ValueError as err:
        parser.error(str(err))
    missing = [
        missing_model_message(f, args.preset, d)
        for f, d in args.model_dirs.items()
        if d is not None and not is_checkpoint(d)
    ]
    if missing:
        parser.error("\n".join(missing))
    args.selected = {}
    for family in args.families:
        rows, aliases = family_rows(family)
        args.selected[family] = (select_rows(family, rows, aliases, args.rows), aliases)
    if args.rows:
        names = {f: [r.name for r in family_rows(f)[0]] + list(family_rows(f)[1]) for f in args.families}
        unmatched = [p for p in args.rows if not any(matches(f, n, p) for f in names for n in names[f])]
        if unmatched:
            every = {f: [r.name for r in family_rows(f)[0]] for f in args.families}
            parser.error(f"--rows {unmatched} match no row of {args.families}; rows: {every}")
    if args.out is None:
        suffix = "_tiny_random" if args.tiny_random else "_quick" if args.quick else ""
        args.out = RESULTS / f"quamba_eval{suffix}.json"
    return args


def load_data(args, tokenizer) -> dict:
    """Calibration windows [N, calib_len] (train split), evaluation windows [n, seq_len + 1] (eval
    split) and the decode prompt (the eval split's first tokens)."""
    sources = text_corpus.SOURCES if args.corpus == "all" else ("pydoc",)
    corpus = text_corpus.load_corpus(sources, max_chars=args.max_chars, tokenizer=tokenizer)
    train, held_out = corpus.split_tokens("train"), corpus.split_tokens("eval")
    rng = np.random.default_rng(SEED)
    calibration = next(text_corpus.batches(train, args.calib_seqs, args.calib_len, rng))[:, :-1]
    windows = text_corpus.eval_windows(held_out, args.seq_len, args.eval_windows)
    if len(held_out) < args.prompt_len:
        raise ValueError(f"--prompt-len {args.prompt_len} exceeds the held-out split ({len(held_out)} tokens)")
    return {
        "calibration": calibration,
        "windows": windows,
        "prompt": held_out[: args.prompt_len].tolist(),
        "separator": corpus.separator,
        "sources": list(sources),
        "train_tokens": len(train),
        "eval_tokens": len(held_out),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    tokenizer = load_tokenizer(ssm_llm.default_model_path())
    data = load_data(args, tokenizer)
    families = {}
    for family in args.families:
        rows, aliases = args.selected[family]
        result = run_family(family, args.model_dirs[family], rows, data, tokenizer, args)
        result["aliases"] = {a: r for a, r in aliases.items() if r in result["rows"]}
        result["targets"] = targets(family, result["rows"])
        result["ingredients"] = ingredient_effects(family, result["rows"])
        families[family] = result

    machine = machine_info()
    result = {
        "script": "experiments/quamba_eval.py",
        "args": {k: str(v) for k, v in vars(args).items() if k != "selected"},
        "seed": SEED,
        "machine": machine,
        "tiny_random": args.tiny_random,
        "setup": {
            "corpus": {
                "sources": data["sources"],
                "max_chars": args.max_chars,
                "train_tokens": data["train_tokens"],
                "eval_tokens": data["eval_tokens"],
                "tokenizer": "SmolLM2-135M-Instruct (GGUF)",
            },
            "calibration": {
                "split": "train",
                "windows": args.calib_seqs,
                "tokens_per_window": args.calib_len,
                "sampling": f"uniform random starts, numpy default_rng({SEED})",
            },
            "evaluation": {
                "split": "eval (held-out documents)",
                "windows": len(data["windows"]),
                "tokens_per_window": args.seq_len,
                "batch": args.eval_batch,
                "path": "ssm_llm.forward from empty states, impl='auto'",
            },
            "decode": {
                "batch": 1,
                "prompt_tokens": args.prompt_len,
                "new_tokens": args.decode_steps,
                "repeats": args.decode_repeats,
                "impl": "auto",
                "timed": "ssm_llm.generate's decode_seconds (its jitted lax.while_loop: decode_steps - 1 "
                "one-token forwards + greedy argmax), after one untimed compiling call per row; "
                "rows interleaved round by round; tok_s = (decode_steps - 1) / median seconds",
            },
            "targets": {f"{b} max ppl increase": m for b, m in TARGETS.items()},
            "notes": "quantized rows keep the embedding and an untied lm_head in float (the final norm folded "
            "into it), as in Quamba2; weight_bytes.linears counts the quantized linears alone",
        },
        "families": families,
        "total_wall_s": time.perf_counter() - wall_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print_table(result, args.out)
    return result


def plot(result: dict, path: Path) -> None:
    """Perplexity / fp32 perplexity per row, one panel per family, with the W8A8 / W4A8 target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    kinds = {
        "fp32": ("gray", "fp32"),
        "naive": ("tab:red", "naive (per-tensor, round-to-nearest)"),
        "full": ("tab:green", "full recipe"),
        "naive+": ("tab:orange", "naive + one ingredient"),
        "full-": ("tab:blue", "full recipe - one ingredient"),
    }
    families = result["families"]
    heights = [0.28 * len(f["rows"]) + 1.2 for f in families.values()]
    fig, axes = plt.subplots(
        len(families), 1, figsize=(8, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (family, data) in zip(axes[:, 0], families.items(), strict=True):
        names = list(data["rows"])
        ratios = np.array([data["rows"][n]["ppl_ratio"] for n in names])
        right = max(1.05, min(float(ratios.max()), 1.25) * 1.02)  # a few very bad rows must not hide 1% steps
        left = min(0.98, float(ratios.min()) - 0.01)
        ys = np.arange(len(names))[::-1]
        ax.barh(
            ys, np.minimum(ratios, right) - left, left=left, color=[kinds[data["rows"][n]["kind"]][0] for n in names]
        )
        for y, r in zip(ys, ratios, strict=True):
            ax.text(min(r, right), y, f" {r:.3f}" + (" →" if r > right else ""), va="center", fontsize=7)
        for bits, margin in TARGETS.items():
            ax.axvline(
                1 + margin,
                linestyle="--",
                linewidth=1,
                color="black" if bits == "W8A8" else "dimgray",
                label=f"{bits} target: +{margin:.0%}",
            )
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_yticks(ys, names, fontsize=7)
        ax.set_xlim(left, right * 1.04)
        ax.set_xlabel("held-out perplexity / fp32's")
        model = data["model"]
        ax.set_title(
            f"{family} ({model['parameters'] / 1e6:.1f}M params, fp32 ppl "
            f"{data['rows']['fp32']['perplexity']:.2f})" + (" — random weights" if result["tiny_random"] else ""),
            fontsize=9,
        )
        shown = dict.fromkeys(data["rows"][n]["kind"] for n in names)
        handles = [Patch(color=kinds[k][0], label=kinds[k][1]) for k in shown]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict, path: Path) -> None:
    machine = result["machine"]
    setup = result["setup"]
    print(
        f"\nresults: {path}; {machine['cpu']} ({machine['cores']} cores, jax {machine['jax_backend']}); "
        f"eval {setup['evaluation']['windows']} x {setup['evaluation']['tokens_per_window']} held-out tokens, "
        f"calibration {setup['calibration']['windows']} x {setup['calibration']['tokens_per_window']}, decode "
        f"batch 1, {setup['decode']['new_tokens']} tokens"
    )
    for family, data in result["families"].items():
        print(f"\n{family}: {data['model']['source']}")
        print(
            f"{'row':<28}{'ppl':>10}{'ratio':>8}{'weights MB':>11}{'linears MB':>11}{'cache KB':>9}"
            f"{'quant s':>8}{'tok/s':>8}{'vs fp32':>8}"
        )
        for name, r in data["rows"].items():
            w = r["weight_bytes"]
            print(
                f"{name:<28}{r['perplexity']:>10.3f}{r['ppl_ratio']:>8.4f}{w['total'] / 1e6:>11.2f}"
                f"{w['linears'] / 1e6:>11.3f}{r['cache_bytes_batch1'] / 1e3:>9.1f}{r['quantize_s']:>8.1f}"
                f"{r['decode']['tok_s']:>8.1f}{r['decode']['ratio_to_fp32']:>7.2f}x"
            )
        if data["aliases"]:
            print(
                "same scheme as a row above (not rerun): " + ", ".join(f"{a} = {r}" for a, r in data["aliases"].items())
            )
        for note in data["notes"]:
            print(f"note: {note}")
        verdicts = []
        for label, t in data["targets"].items():
            verdicts.append(
                f"{label}: "
                + ("not run" if t["holds"] is None else f"{'yes' if t['holds'] else 'NO'} ({t['ppl_ratio']:.4f})")
            )
        print("targets: " + "; ".join(verdicts))
        for ingredient, per_bits in data["ingredients"].items():
            cells = []
            for bits, v in per_bits.items():
                if isinstance(v, str):
                    continue
                mark = {True: "yes", False: "NO", None: "-"}
                cells.append(f"{bits} add {mark[v['adding_lowers_ppl']]} / remove {mark[v['removing_raises_ppl']]}")
            print(f"  {ingredient:<11} helps (adding lowers ppl / removing raises it): " + ", ".join(cells))
    if result["tiny_random"]:
        print(
            "(--tiny-random: random weights, so perplexities near the vocabulary size and the verdicts say "
            "nothing; this only checks that the script runs)"
        )
    print(f"total {result['total_wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
