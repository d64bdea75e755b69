"""Train a small Mamba-2 (or Mamba-1) language model from scratch on real English text, on CPU.

The text is Python's language reference and Vim's manuals (`text_corpus`), tokenized with SmolLM2's
tokenizer (vocabulary 49152); about 10% of its documents are held out for the perplexity at the end.
The models are `ssm_llm`'s own Mamba stacks (`impl="xla"`, the pure-jnp paths, which differentiate),
with tied embeddings and power-of-two widths (later Hadamard rotations need them):
  * small: hidden 256, 8 layers, intermediate 512; Mamba-2 8 heads of 64, state 64, 1 group;
           Mamba-1 state 16. ~16M parameters, 12.6M of them the embedding.
  * tiny:  hidden 64, 2 layers, intermediate 128; Mamba-2 4 heads of 32, state 16; Mamba-1 state 8 (tests).
Training: next-token cross-entropy (float32) over random windows [batch, seq_len] of the training
tokens; AdamW (b2 0.95, weight decay on matrices and the embedding only, not on norms, biases,
A_log, D, dt_bias), gradients clipped to global norm 1, linear warmup then cosine decay to 10% of
the peak over --steps. Stops at --steps or after --minutes, whichever comes first.
Checkpoints (orbax) go to --out every --ckpt-every steps and when the run stops: params, optimizer
state, step, the data sampler's RNG state and the loss curve, so a later call with the same --out
resumes exactly where it stopped (N steps + resume + N steps gives the same params as 2N steps).
At the end: held-out perplexity, the model exported with `converters.checkpoint.save` to <out>/model
(loads with `converters.load` / `load_checkpoint`), a greedy sample from the reloaded model, and
experiments/results/train_<family>_<preset>.json (+ .png loss plot); a short table is printed last.

    python experiments/train_mamba2.py --family mamba2 --preset small            # ~25-30 min on 2 cores
    python experiments/train_mamba2.py --family mamba2 --preset small --minutes 2  # a timing run
    python experiments/train_mamba2.py --family mamba1 --preset tiny --steps 50 --corpus pydoc
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import text_corpus  # noqa: E402
from bench_runners import machine_info  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import ssm_llm  # noqa: E402
from converters.cache_dir import cache_root  # noqa: E402
from converters.checkpoint import load_checkpoint, save  # noqa: E402
from converters.tokenizer import load_tokenizer  # noqa: E402
from ssm_llm.models.lm_head import logits_from_hidden  # noqa: E402
from ssm_llm.models.mamba_lm import hidden_states, init_params  # noqa: E402
from ssm_llm.ssm_cache import init_ssm_cache  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0
FAMILIES = ("mamba2", "mamba1")
PRESETS = {
    "small": dict(hidden_size=256, num_layers=8, head_dim=64),
    "tiny": dict(hidden_size=64, num_layers=2, head_dim=32),
}
STATE_SIZE = {("mamba2", "small"): 64, ("mamba2", "tiny"): 16, ("mamba1", "small"): 16, ("mamba1", "tiny"): 8}
# small: steps of a ~25-30 min run at the default batch and seq-len on 2 idle cores. Measured on a shared
# 2-core machine (about one core free): 4.7 s/step Mamba-2, 9.7 s/step Mamba-1 (its selective scan carries
# a [I, N] state per channel); two idle cores are taken as ~1.8x faster.
DEFAULT_STEPS = {("mamba2", "small"): 600, ("mamba1", "small"): 300, ("mamba2", "tiny"): 200, ("mamba1", "tiny"): 200}
# What a checkpoint must agree on to be resumed: everything that shapes the training trajectory.
RUN_KEYS = (
    "family",
    "preset",
    "steps",
    "batch",
    "seq_len",
    "lr",
    "warmup",
    "weight_decay",
    "clip",
    "seed",
    "corpus",
    "max_chars",
)


def model_config(
    family: str, preset: str, vocab_size: int, bos_token_id: int | None, eos_token_id: int
) -> ssm_llm.MambaConfig | ssm_llm.Mamba2Config:
    """The preset's model: tied embeddings, intermediate = 2 x hidden, EOS = the corpus separator."""
    p = PRESETS[preset]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=p["hidden_size"],
        num_layers=p["num_layers"],
        intermediate_size=2 * p["hidden_size"],
        state_size=STATE_SIZE[family, preset],
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_ids=(eos_token_id,),
    )
    if family == "mamba1":
        return ssm_llm.MambaConfig(**common)
    return ssm_llm.Mamba2Config(
        **common, head_dim=p["head_dim"], num_heads=common["intermediate_size"] // p["head_dim"], n_groups=1
    )


@dataclasses.dataclass(frozen=True)
class Hparams:
    """The optimizer's settings (hashable: a static argument of the jitted step)."""

    steps: int
    peak_lr: float
    warmup: int
    weight_decay: float
    clip: float


def decay_mask(params: dict) -> dict:
    """True for the weights that get weight decay: matrices and the embedding, not norms, biases,
    A_log, D or dt_bias (decaying those would pull the SSM dynamics and scales toward zero)."""

    def decays(path, _):
        name = path[-1].key
        return not ("norm" in name or name.endswith("_b") or name in ("A_log", "D", "dt_bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(h: Hparams) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, h.peak_lr, h.warmup, h.steps, end_value=0.1 * h.peak_lr)
    return optax.chain(
        optax.clip_by_global_norm(h.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=h.weight_decay, mask=decay_mask),
    )


def model_logits(params: dict, config, tokens: jax.Array) -> jax.Array:
    """Logits `[B, T, V]` (float32) of `tokens: [B, T]` from empty states, through the jnp paths."""
    batch, steps = tokens.shape
    # Unrolled layers train 10-20% faster on CPU than a scan over the stacked ones (measured on the
    # small presets; see ssm_llm.layer_layout); params, optimizer state and checkpoints stay stacked.
    params = ssm_llm.unstack_layers(params)
    h, _ = hidden_states(
        params, config, tokens, init_ssm_cache(config, batch), jnp.full((batch,), steps, jnp.int32), impl="xla"
    )
    return logits_from_hidden(params, config, h).astype(jnp.float32)


def window_nll(params: dict, config, windows: jax.Array) -> jax.Array:
    """Next-token negative log-likelihood `[B, T]` of `windows: [B, T + 1]` (inputs, then targets)."""
    logits = model_logits(params, config, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


def init_state(config, h: Hparams, seed: int) -> dict:
    """The training state: params, optimizer state and the number of steps taken."""
    params = init_params(config, jax.random.PRNGKey(seed))
    return {"params": params, "opt_state": make_optimizer(h).init(params), "step": jnp.zeros((), jnp.int32)}


@functools.partial(jax.jit, static_argnames=("config", "h"), donate_argnames=("state",))
def train_step(state: dict, windows: jax.Array, config, h: Hparams) -> tuple[dict, dict]:
    """One AdamW step on the mean NLL of `windows: [B, T + 1]`; returns the new state and
    {"loss", "grad_norm"} (before the step's update)."""
    loss, grads = jax.value_and_grad(lambda p: window_nll(p, config, windows).mean())(state["params"])
    updates, opt_state = make_optimizer(h).update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "step": state["step"] + 1}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("config",))
def _nll_sums(params, config, windows):
    return window_nll(params, config, windows).sum(axis=1)


def mean_nll(params: dict, config, windows: np.ndarray, batch: int) -> float:
    """Mean next-token NLL over all targets of `windows: [n, T + 1]`, `batch` windows per call (the
    last batch is padded with repeats, so one compiled shape serves all)."""
    sums = []
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
        sums.append(np.asarray(_nll_sums(params, config, jnp.asarray(padded)))[: len(chunk)])
    return float(np.concatenate(sums).sum() / (windows.shape[0] * (windows.shape[1] - 1)))


# ---------------------------------------------------------------- checkpoints


def checkpoint_manager(directory: Path):
    """An orbax CheckpointManager over `directory` (keeps the last 2 checkpoints, saves synchronously)."""
    import orbax.checkpoint as ocp

    # Synchronous saves: the next step donates the state's buffers, which an async save may still read.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_checkpoint(manager, state: dict, progress: dict) -> None:
    """Save the training state (arrays) and `progress` (JSON: run settings, data RNG state, losses)."""
    import orbax.checkpoint as ocp

    manager.save(
        int(state["step"]),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
    )
    manager.wait_until_finished()


def restore_checkpoint(manager, like: dict) -> tuple[dict, dict]:
    """The latest checkpoint's (state, progress); `like`: a state of the same structure and shapes."""
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["progress"]


def _check_same_run(saved: dict, run: dict, directory: Path) -> None:
    diff = {k: (saved.get(k), run[k]) for k in RUN_KEYS if saved.get(k) != run[k]}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{directory} holds a checkpoint of a different run ({detail}); pass the same settings "
            f"to resume it, --restart to discard it, or another --out"
        )


# ---------------------------------------------------------------- the run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="mamba2")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps; the LR schedule spans them (default per family and preset: "
        + ", ".join(f"{f}/{p} {n}" for (f, p), n in DEFAULT_STEPS.items())
        + ")",
    )
    parser.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this much wall time")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop (checkpointed) after this step, the schedule still spanning --steps; "
        "a later call with the same --out resumes",
    )
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default min(100, steps // 10))")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    parser.add_argument("--seed", type=int, default=SEED, help="seeds the init and the data sampler")
    parser.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every this many steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoints and the exported model (default $SSM_LLM_CACHE/train/<family>-<preset>, "
        "i.e. ~/.cache/ssm_llm/train/...); a checkpoint there is resumed",
    )
    parser.add_argument("--restart", action="store_true", help="discard --out's checkpoints and start over")
    parser.add_argument(
        "--corpus",
        choices=("all", "pydoc"),
        default="all",
        help="all: Python reference + Vim manuals; pydoc: the Python reference only",
    )
    parser.add_argument("--max-chars", type=int, default=None, help="use only the first documents, this many chars")
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows for the perplexity")
    parser.add_argument("--sample-tokens", type=int, default=40, help="greedy tokens of the sanity sample (0: none)")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="JSON path (default experiments/results/train_<family>_<preset>.json; PNG beside it)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.family, args.preset]
    if args.warmup is None:
        args.warmup = min(100, args.steps // 10)
    for name in ("steps", "batch", "seq_len", "ckpt_every", "eval_windows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sample_tokens < 0:
        parser.error(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must lie in [0, --steps) = [0, {args.steps}), got {args.warmup}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        parser.error(f"--stop-at must lie in [1, --steps = {args.steps}], got {args.stop_at}")
    if args.out is None:
        args.out = cache_root() / "train" / f"{args.family}-{args.preset}"
    if args.results is None:
        args.results = RESULTS / f"train_{args.family}_{args.preset}.json"
    return args


def train(args: argparse.Namespace, config, h: Hparams, train_tokens: np.ndarray) -> tuple[dict, dict, dict]:
    """Train from scratch or from --out's latest checkpoint up to --steps / --stop-at / --minutes,
    checkpointing on the way and at the end. Returns (state, progress, this run's timings)."""
    if args.restart and args.out.exists():
        shutil.rmtree(args.out)
    manager = checkpoint_manager(args.out / "checkpoints")
    state = init_state(config, h, args.seed)
    rng = np.random.default_rng(args.seed)
    run = {k: getattr(args, k) for k in RUN_KEYS}
    progress = {"run": run, "rng": rng.bit_generator.state, "losses": [], "grad_norms": [], "train_seconds": 0.0}
    if manager.latest_step() is not None:
        state, progress = restore_checkpoint(manager, state)
        _check_same_run(progress["run"], run, args.out)
        rng.bit_generator.state = progress["rng"]
        tqdm.write(f"resuming {args.out} at step {int(state['step'])}")
    start_step, earlier_seconds = int(state["step"]), progress["train_seconds"]
    stop = min(args.steps, args.stop_at or args.steps)
    data = text_corpus.batches(train_tokens, args.batch, args.seq_len, rng)

    tokens_per_step = args.batch * args.seq_len
    step_times = []
    load_before = os.getloadavg()[0]
    loop_start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=args.steps, initial=start_step, desc=f"train {args.family}-{args.preset}", unit="step")
    while int(state["step"]) < stop:
        if args.minutes is not None and time.perf_counter() - loop_start >= 60 * args.minutes:
            break
        t0 = time.perf_counter()
        state, metrics = train_step(state, jnp.asarray(next(data)), config, h)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # also waits for the step
        step_times.append(time.perf_counter() - t0)
        progress["losses"].append(loss)
        progress["grad_norms"].append(grad_norm)
        progress.update(rng=rng.bit_generator.state, train_seconds=earlier_seconds + sum(step_times))
        recent = step_times[1:][-20:] or step_times  # the first step includes compilation
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / statistics.median(recent):.0f}")
        bar.update()
        step = int(state["step"])
        if step % args.ckpt_every == 0 and step < stop:
            save_checkpoint(manager, state, progress)
    bar.close()
    loop_seconds, cpu_seconds = time.perf_counter() - loop_start, time.process_time() - cpu_start
    if manager.latest_step() != int(state["step"]):
        save_checkpoint(manager, state, progress)
    manager.close()

    timed = step_times[1:]
    median = statistics.median(timed) if timed else None
    this_run = {
        "start_step": start_step,
        "steps": int(state["step"]) - start_step,
        "loop_seconds": loop_seconds,
        "loop_process_cpu_seconds": cpu_seconds,
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "first_step_s": step_times[0] if step_times else None,
        "median_step_s": median,
        "tokens_per_s": tokens_per_step / median if median else None,
    }
    return state, progress, this_run


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    tokenizer = load_tokenizer(ssm_llm.default_model_path())
    sources = text_corpus.SOURCES if args.corpus == "all" else ("pydoc",)
    corpus = text_corpus.load_corpus(sources, max_chars=args.max_chars, tokenizer=tokenizer)
    train_tokens, eval_tokens = corpus.split_tokens("train"), corpus.split_tokens("eval")
    setup_seconds = time.perf_counter() - wall_start
    config = model_config(args.family, args.preset, len(tokenizer), tokenizer.bos_token_id, corpus.separator)
    h = Hparams(steps=args.steps, peak_lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip)

    state, progress, this_run = train(args, config, h, train_tokens)
    params = state["params"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    final_step = int(state["step"])

    phase_start = time.perf_counter()
    windows = text_corpus.eval_windows(eval_tokens, args.seq_len, args.eval_windows)
    nll = mean_nll(params, config, windows, args.batch)
    eval_seconds = time.perf_counter() - phase_start
    phase_start = time.perf_counter()
    model_dir = save(params, config, args.out / "model", tokenizer=tokenizer, overwrite=True)
    export_seconds = time.perf_counter() - phase_start
    phase_start = time.perf_counter()
    loaded_config, loaded_params = load_checkpoint(model_dir)
    prompt, sample = eval_tokens[:24].tolist(), []
    if args.sample_tokens:
        sample = ssm_llm.generate(
            loaded_params, loaded_config, [prompt], ssm_llm.GenerationConfig(max_new_tokens=args.sample_tokens)
        ).tokens[0]
    sample_seconds = time.perf_counter() - phase_start

    result = {
        "script": "experiments/train_mamba2.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seed": args.seed,
        "machine": machine_info(),
        "model": {
            "family": args.family,
            "preset": args.preset,
            "config": config.to_dict(),
            "parameters": n_params,
            "parameters_without_embedding": n_params - config.vocab_size * config.hidden_size,
            "exported_to": str(model_dir),
        },
        "corpus": {
            "sources": list(sources),
            "max_chars": args.max_chars,
            "documents": len(corpus.documents),
            "held_out_documents": int(corpus.held_out.sum()),
            "train_tokens": len(train_tokens),
            "eval_tokens": len(eval_tokens),
            "tokenizer": "SmolLM2-135M-Instruct (GGUF)",
            "separator_token": corpus.separator,
        },
        "training": {
            "steps_target": args.steps,
            "steps_done": final_step,
            "completed": final_step == args.steps,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "tokens_seen": final_step * args.batch * args.seq_len,
            "peak_lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.weight_decay,
            "clip": args.clip,
            "schedule": "linear warmup, cosine decay to 0.1 x peak over steps_target",
            "optimizer": "adamw(b1=0.9, b2=0.95), clip_by_global_norm",
            "impl": "xla",
            "train_seconds_total": progress["train_seconds"],
            "this_run": this_run,
            "losses": progress["losses"],
            "grad_norms": progress["grad_norms"],
        },
        "eval": {
            "split": "held-out documents",
            "windows": len(windows),
            "tokens": int(windows.shape[0] * args.seq_len),
            "mean_nll": nll,
            "perplexity": math.exp(nll),
            "uniform_perplexity": config.vocab_size,
        },
        "sample": {
            "prompt": tokenizer.decode(prompt),
            "greedy_continuation": tokenizer.decode(sample),
            "model": "the exported checkpoint, reloaded",
        }
        if args.sample_tokens
        else None,
        "phase_seconds": {
            "tokenizer_and_corpus": setup_seconds,
            "training_loop": this_run["loop_seconds"],
            "eval": eval_seconds,
            "export": export_seconds,
            "reload_and_sample": sample_seconds,
        },
        "total_wall_s": time.perf_counter() - wall_start,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    plot(result, args.results.with_suffix(".png"))
    print_summary(result, args.results)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(result["training"]["losses"])
    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (per step)")
    if len(losses) >= 20:
        width = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1 :], smooth, color="tab:blue", label=f"train loss ({width}-step mean)")
    ev = result["eval"]
    ax.scatter(
        [len(losses)],
        [ev["mean_nll"]],
        color="tab:red",
        zorder=3,
        label=f"held-out NLL {ev['mean_nll']:.3f} (ppl {ev['perplexity']:.1f})",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    m = result["model"]
    t = result["training"]
    ax.set_title(
        f"{m['family']}-{m['preset']} ({m['parameters'] / 1e6:.1f}M params), {t['steps_done']} / "
        f"{t['steps_target']} steps of {t['batch']} x {t['seq_len']} tokens",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(result: dict, path: Path) -> None:
    m, t, ev = result["model"], result["training"], result["eval"]
    this = t["this_run"]
    if result["sample"]:
        print(
            f"\nsample (reloaded export, greedy): {result['sample']['prompt']!r} -> "
            f"{result['sample']['greedy_continuation']!r}"
        )
    print(f"results: {path}; model: {m['exported_to']}")
    rows = [
        (
            "model",
            f"{m['family']}-{m['preset']}, {m['parameters'] / 1e6:.2f}M params "
            f"({m['parameters_without_embedding'] / 1e6:.2f}M without the embedding)",
        ),
        ("steps", f"{t['steps_done']} / {t['steps_target']}" + ("" if t["completed"] else " (stopped early)")),
        ("tokens seen", f"{t['tokens_seen']:,}"),
        (
            "this run",
            f"{this['steps']} steps in {this['loop_seconds']:.0f} s"
            + (
                f", {this['median_step_s']:.2f} s/step, {this['tokens_per_s']:.0f} tok/s"
                if this["median_step_s"]
                else ""
            ),
        ),
        ("final train loss", f"{np.mean(t['losses'][-20:]):.3f} (mean of last 20 steps)" if t["losses"] else "-"),
        (
            "held-out",
            f"NLL {ev['mean_nll']:.3f}, perplexity {ev['perplexity']:.1f} "
            f"({ev['windows']} windows, {ev['tokens']:,} tokens)",
        ),
    ]
    for name, value in rows:
        print(f"{name:<18}{value}")


if __name__ == "__main__":
    main()
