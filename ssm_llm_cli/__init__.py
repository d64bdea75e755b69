"""The `ssm-llm` command line: `generate` text (streamed as it is produced), `convert` checkpoints, and
list or clear the `cache` of converted models."""

# The top layer: it imports converters and ssm_llm, and nothing below imports it (`python -m ssm_llm_cli`
# runs it too).

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import numpy as np

from ssm_llm.jrt import read_twice
from ssm_llm.quant.presets import PRESETS

NO_CACHE_ENV = "SSM_LLM_NO_CACHE"
# The smallest compile (seconds) worth a persistent-cache entry: the CLI's prefill and decode programs
# take 0.5-2 s on the 2-core CPU; the many tiny helper programs are cheaper to recompile than to store.
MIN_CACHED_COMPILE_SECONDS = 0.2


def _env_flag(name: str) -> bool:
    """An environment variable set to anything but "" or "0"."""
    return os.environ.get(name, "") not in ("", "0")


def _cache_enabled(args) -> bool:
    return not getattr(args, "no_cache", False) and not _env_flag(NO_CACHE_ENV)


def _model_path(model: str | None) -> Path:
    from ssm_llm.default_model import default_model_path

    return Path(model) if model else default_model_path()


# --quantize: "none", "auto" (int8 where its products are faster here, measured once) or a preset of
# ssm_llm.quant.presets; `converters.load(quantize=...)` resolves all of them.
QUANTIZE_CHOICES = ["none", "auto", *PRESETS]


def _load(path: Path, quantize: str | None = None, cache: bool = False, mesh=None, verbose: bool = True):
    import converters

    quantize = None if quantize == "none" else quantize
    if verbose:
        print(f"loading {path}" + (f" as {quantize}" if quantize else ""), file=sys.stderr)
    config, params = converters.load(
        path, progress=verbose, quantize=quantize, cache=cache, cache_in_background=True, mesh=mesh
    )
    if verbose and quantize == "auto":
        print(f"[--quantize auto: {_auto_outcome(config, path)}]", file=sys.stderr)
    return config, params


def _auto_outcome(config, path: Path) -> str:
    """What --quantize auto chose, and why (the measurement was recorded by the load)."""
    import converters
    from converters.checkpoint import is_checkpoint
    from ssm_llm.config import ModelConfig
    from ssm_llm.quant.presets import AUTO_PRESET, preset_of

    if not isinstance(config, ModelConfig):
        return f"float32 (a {type(config).__name__}: int8 inference is for attention models)"
    if config.quantization != "none" and (is_checkpoint(path) or preset_of(config) != AUTO_PRESET):
        return f"the checkpoint's own {preset_of(config) or config.quantization} weights, kept"
    _, why = converters.int8_decision()
    if config.quantization == "none":
        return f"float32 ({why})"
    return f"{AUTO_PRESET} ({why}; --quantize none for float32)"


def _parse_mesh(text: str) -> tuple[int, int]:
    """--mesh "DPxTP" -> (dp, tp)."""
    dp, sep, tp = text.lower().partition("x")
    if not sep or not dp.isdigit() or not tp.isdigit() or int(dp) < 1 or int(tp) < 1:
        raise argparse.ArgumentTypeError(f"expected DPxTP with positive sizes, e.g. 1x3 or 2x4; got {text!r}")
    return int(dp), int(tp)


def _join_processes(args) -> None:
    """jax.distributed for a multi-process run (--coordinator, --num-processes, --process-id)."""
    given = [args.num_processes is not None, args.process_id is not None]
    if args.coordinator is None:
        if any(given):
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if not all(given):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    from ssm_llm.sharding import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)


def _mesh(args):
    """The ("data", "model") mesh of --mesh over every device of the run, or None."""
    if args.mesh is None:
        return None
    import jax

    dp, tp = args.mesh
    if dp * tp != jax.device_count():
        raise ValueError(f"--mesh {dp}x{tp} needs {dp * tp} devices; this run has {jax.device_count()}")
    return jax.make_mesh((dp, tp), ("data", "model"))


class _CompileClock:
    """Seconds JAX spends compiling (tracing, lowering, XLA or a persistent-cache read), with the time each
    compile ended, from `jax.monitoring`'s duration events; a context manager (listens while inside)."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        self.spans: list[tuple[float, float]] = []  # (end time on perf_counter, seconds)

    def _on_event(self, name, seconds, **_):
        if name in self.EVENTS:
            self.spans.append((time.perf_counter(), seconds))

    def seconds(self, start: float = float("-inf"), end: float = float("inf")) -> float:
        """Compile seconds of the compiles that ended in [start, end)."""
        return sum(s for t, s in self.spans if start <= t < end)

    def __enter__(self):
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_event)


class _TextStream:
    """Prints the text of one growing token sequence as new tokens arrive (`generate`'s on_token)."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.printed = ""
        self.finished = False

    def __call__(self, step, tokens):
        token = int(np.asarray(tokens)[0])
        if self.finished or token < 0 or token in self.stop_ids:
            self.finished = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.printed) :])
            sys.stdout.flush()
            self.printed = text


def _drafter(spec: str | None):
    """`--speculative`'s drafter: the train-free ones of `ssm_llm.speculative.spec`, or "forced_tokens" (the tokens
    a constraint forces, `constrained_speculation.ForcedTokens`)."""
    if spec is None:
        return None
    from ssm_llm.constrained_speculation import ForcedTokens
    from ssm_llm.option_spec import parse_spec
    from ssm_llm.speculative.spec import DRAFTERS

    return parse_spec(spec, {**DRAFTERS, "forced_tokens": ForcedTokens}, "speculative drafter", hidden=("adjacency",))


def _generate(args) -> int:
    from ssm_llm.constrained_speculation import ForcedTokens
    from ssm_llm.generation import GenerationConfig
    from ssm_llm.kv.spec import parse_policy

    drafter = _drafter(args.speculative)
    args.constraint_source = _constraint_source(args)
    if isinstance(drafter, ForcedTokens) and args.constraint_source is None:
        raise ValueError(
            "--speculative forced_tokens drafts what a constraint forces: give --regex, --json-schema or --grammar"
        )
    # a constrained run gets its drafter with its constraint, once the tokenizer has compiled it
    args.constrained_drafter = drafter if args.constraint_source is not None else None
    gen_config = GenerationConfig(  # validate the options before the slow model load
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        kv_compression=parse_policy(args.kv_compression) if args.kv_compression is not None else None,
        speculative=None if args.constraint_source is not None else drafter,
        sparse_prefill=_sparse_prefill(args.sparse_prefill),
        num_beams=args.num_beams,
        num_beam_groups=args.num_beam_groups,
        diversity_penalty=args.diversity_penalty,
        length_penalty=args.length_penalty,
    )
    args.context = _read_twice_context(args.read_twice)
    if args.constraint_source is not None and gen_config.num_beams > 1:
        raise ValueError("a constraint (--regex / --json-schema / --grammar) does not combine with --num-beams yet")
    if args.constraint_source is not None and drafter is not None and gen_config.temperature > 0:
        raise ValueError("a constraint (--regex / --json-schema / --grammar) with --speculative is greedy only")
    _join_processes(args)  # before anything touches JAX's devices
    with _CompileClock() as clock:
        return _run_generation(args, gen_config, clock)


def _sparse_prefill(spec: str | None):
    """`--sparse-prefill SPEC` -> a sparse prefill method (None: dense prefill)."""
    if spec is None:
        return None
    from ssm_llm.kv.minference import MInference
    from ssm_llm.option_spec import parse_spec

    return parse_spec(spec, {"minference": MInference}, "sparse prefill method")


def _constraint_source(args) -> tuple[str, str] | None:
    """`--regex` / `--json-schema` / `--grammar` -> (kind, text), read and checked before the model loads
    (compiled once the tokenizer is known). A schema or grammar is a file's path, or else the text itself."""
    options = (("regex", args.regex), ("json", args.json_schema), ("lark", args.grammar))
    given = [(kind, value) for kind, value in options if value is not None]
    if len(given) > 1:
        raise ValueError("--regex, --json-schema and --grammar are three kinds of constraint: give one")
    if not given:
        return None
    kind, value = given[0]
    if kind != "regex" and _is_file(value):
        value = Path(value).read_text(encoding="utf-8")
    elif kind == "json" and not value.lstrip().startswith(("{", "true", "false")):
        raise FileNotFoundError(f"--json-schema: {value!r} is neither a file nor a JSON schema's text")
    return kind, value


def _is_file(value: str) -> bool:
    """Whether `value` names an existing file (text too long or odd for a path is not one)."""
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False


def _read_twice_context(value: str | None) -> str | None:
    """`--read-twice`'s context: a file's text when the path exists, else the text itself (checked before the
    model loads)."""
    if value is None:
        return None
    text = Path(value).read_text(encoding="utf-8") if _is_file(value) else value
    if not text.strip():
        raise ValueError("--read-twice: the context is empty; there is nothing to read twice")
    return text


def _constraint(source: tuple[str, str] | None, tokenizer, eos):
    """The compiled constraint of `_constraint_source`'s (kind, text) for this tokenizer (None: none)."""
    if source is None:
        return None
    from ssm_llm import constraints

    kind, text = source
    bound = constraints.tokenizer(tokenizer, sorted(eos))
    return {"regex": constraints.Regex, "json": constraints.JSONSchema, "lark": constraints.Grammar}[kind](text, bound)


def _run_generation(args, gen_config, clock: _CompileClock) -> int:
    import dataclasses

    import converters
    from pallas_kernels import cpu_attention
    from ssm_llm.generation import generate
    from ssm_llm.sharding import is_main_process

    mesh = _mesh(args)
    main_process = is_main_process()  # the others compute their shards and print nothing
    # A GGUF tokenizer that is not cached yet is built in a child process while the model converts (two
    # threads were slower: GIL contention, 26 s against 19.6 s); a cached one loads in 0.1 s after the model.
    started = time.perf_counter()
    path = _model_path(args.model)
    quantize = args.quantize
    drafter = args.constrained_drafter or gen_config.speculative
    if (
        quantize == "auto"
        and drafter is not None
        and (mesh is not None or not cpu_attention.runs_here(drafter.tree_size))
    ):
        # W8A8 verification reproduces plain decoding through the CPU attention kernel only (one device, trees of
        # at most MAX_ROWS nodes): elsewhere a W8A8 model's rounding follows the forward's shape, and only float32
        # stays lossless.
        quantize = "none"
        if main_process:
            print(
                "[--quantize auto: float32 (--speculative is exact on W8A8 weights only through the CPU attention "
                "kernel, on one device)]",
                file=sys.stderr,
            )
    if quantize == "auto" and path.exists():
        converters.int8_decision()  # a first measurement before the tokenizer's child process loads a core
    with converters.tokenizer_built_aside(path):
        config, params = _load(path, quantize, _cache_enabled(args), mesh, verbose=main_process)
    if args.layers == "unrolled":
        from ssm_llm.layer_layout import unstack_layers

        params = unstack_layers(params)
    loaded = time.perf_counter()
    tokenizer = converters.load_text_tokenizer(path)
    tokenized = time.perf_counter()
    prompt = args.prompt if args.context is None else read_twice(args.context, args.prompt)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    eos = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    constraint = _constraint(args.constraint_source, tokenizer, eos)
    gen_config = dataclasses.replace(gen_config, eos_token_ids=tuple(sorted(eos)), constraint=constraint)
    if args.constrained_drafter is not None:
        gen_config = dataclasses.replace(gen_config, speculative=args.constrained_drafter)
    # A speculative round emits several tokens at once and beams are reordered, so their text is printed at the end.
    whole = args.no_stream or gen_config.speculative is not None or gen_config.num_beams > 1
    stream = None if whole else _TextStream(tokenizer, eos)
    if not main_process:
        stream = None
    result = generate(params, config, [ids], gen_config, on_token=stream)
    gen_end = time.perf_counter()
    if not main_process:
        return 0
    if stream is None:
        sys.stdout.write(tokenizer.decode(result.tokens[0], skip_special_tokens=True))
    else:
        # Flush anything held back while waiting for a multi-byte character.
        sys.stdout.write(tokenizer.decode(result.tokens[0], skip_special_tokens=True)[len(stream.printed) :])
    sys.stdout.write("\n")
    n = len(result.tokens[0])
    # Compilation apart: compiles that ended before the prefill did belong to it, the rest to decoding.
    prefill_end = gen_end - result.decode_seconds
    compile_prefill = clock.seconds(prefill_end - result.prefill_seconds, prefill_end)
    compile_decode = clock.seconds(prefill_end, gen_end)
    prefill = max(result.prefill_seconds - compile_prefill, 0.0)
    decode = max(result.decode_seconds - compile_decode, 1e-9)
    print(
        f"[{len(ids)} prompt tokens, {n} new ({result.finish_reasons[0]}); load {loaded - started:.2f} s, "
        f"compile {compile_prefill + compile_decode:.2f} s, prefill {prefill:.2f} s, decode {n / decode:.1f} tok/s]",
        file=sys.stderr,
    )
    if args.verbose:
        total = gen_end - started
        parts = {
            "load": loaded - started,
            "tokenizer": tokenized - loaded,
            "compile": compile_prefill + compile_decode,
            "prefill": prefill,
            "decode": decode,
        }
        parts["other"] = total - sum(parts.values())
        print(f"[{total:.2f} s = " + " + ".join(f"{k} {v:.2f}" for k, v in parts.items()) + "]", file=sys.stderr)
    if result.speculative is not None:
        print(
            f"[speculative: {result.speculative.rounds[0]} target forwards, "
            f"{result.speculative.tokens_per_round:.2f} tokens per forward]",
            file=sys.stderr,
        )
    return 0


def _convert(args) -> int:
    import jax.numpy as jnp

    import converters
    from converters.checkpoint import check_destination

    # Before the slow load: refuse a destination that holds anything but a checkpoint, or the source.
    dest = check_destination(args.dest, overwrite=args.overwrite, source=args.source, flag="--overwrite")
    quantize = None if args.quantize == "none" else args.quantize
    config, params = converters.load(args.source, dtype=jnp.dtype(args.dtype), progress=True, quantize=quantize)
    try:
        tokenizer = converters.load_tokenizer(args.source)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"warning: saving without a tokenizer ({e})", file=sys.stderr)
        tokenizer = None
    out = converters.save(params, config, dest, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    import uvicorn

    import converters
    from ssm_llm.config import ModelConfig
    from ssm_llm.kv import StreamingLLM
    from ssm_llm.serving import AsyncEngine, Engine
    from ssm_llm.speculative import PromptLookup
    from ssm_llm_cli.server import build_app

    if args.prompt_lookup:  # a bad N is refused before the slow load
        PromptLookup(num_tokens=args.prompt_lookup)
    policy = None
    if args.streaming_llm:
        if args.prompt_lookup:
            raise ValueError("--streaming-llm and --prompt-lookup do not combine: a streaming request cannot speculate")
        policy = StreamingLLM(budget=args.streaming_llm, sinks=args.streaming_sinks, positions="original")
    use_compilation_cache()
    path = _model_path(args.model)
    config, params = _load(path, args.quantize, cache=_cache_enabled(args))
    if policy is not None:
        if not isinstance(config, ModelConfig):
            raise ValueError(f"--streaming-llm is for attention models; {path.name} is a {type(config).__name__}")
        policy.check(config, None)
    tokenizer = converters.load_text_tokenizer(path)
    max_len = min(args.max_len, config.max_position_embeddings or args.max_len)
    front = AsyncEngine(Engine(params, config, max_slots=args.max_slots, max_len=max_len))
    app = build_app(front, tokenizer, path.name, args.max_waiting, args.prompt_lookup, policy)
    print(f"serving {path.name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        # SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish (streams included) for up to
        # --shutdown-timeout seconds, then cancel what is left; uvicorn re-raises the signal afterwards.
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout
        )
    finally:
        front.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssm-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt (default model: SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--model", help="GGUF file, Hugging Face directory or ssm-llm checkpoint (default: embedded SmolLM2)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--system", help="system message for --chat")
    gen.add_argument("--no-stream", action="store_true", help="print the text only when generation ends")
    gen.add_argument(
        "--kv-compression",
        metavar="SPEC",
        help="compress the KV cache, e.g. 'streamingllm:budget=256,sinks=4' or 'snapkv:budget=0.25' "
        "(a method of ssm_llm.kv and its parameters)",
    )
    gen.add_argument(
        "--sparse-prefill",
        metavar="SPEC",
        help="a long prompt's prefill on MInference's sparse attention: 'minference' (every head vertical-slash, "
        "8 blocks of 64 + 256 columns per query block) or e.g. 'minference:blocks=16,columns=512,dense_layers=(0,)'",
    )
    gen.add_argument(
        "--speculative",
        metavar="SPEC",
        help="lossless speculative decoding with a train-free drafter: 'prompt_lookup', "
        "'prompt_lookup:num_tokens=8' or 'token_recycling' (the text is printed at the end; on a "
        "CPU it pays off mainly when the answer copies the prompt); with a constraint (greedy) also "
        "'forced_tokens' (the tokens the grammar forces)",
    )
    gen.add_argument(
        "--read-twice",
        metavar="FILE_OR_TEXT",
        help="just-read-twice prompting (for recurrent models): this context written twice, led by the prompt "
        "(the question) and followed by it: 'PROMPT CONTEXT\\nCONTEXT PROMPT'",
    )
    gen.add_argument("--regex", help="structured output: the text must match this regular expression")
    gen.add_argument(
        "--json-schema",
        metavar="FILE_OR_JSON",
        help="structured output: one JSON value valid under this schema (a file or the schema's JSON text)",
    )
    gen.add_argument(
        "--grammar", metavar="FILE_OR_LARK", help="structured output: a Lark context-free grammar (rule `start`)"
    )
    gen.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams (temperature 0; the best hypothesis is printed at the end)",
    )
    gen.add_argument(
        "--num-beam-groups", type=int, default=1, help="diverse beam search: the beams split into this many groups"
    )
    gen.add_argument(
        "--diversity-penalty", type=float, default=0.0, help="diverse beam search: the penalty between groups"
    )
    gen.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam search: finished hypotheses score log-probability / length ** this",
    )
    gen.add_argument(
        "--layers",
        choices=["stacked", "unrolled"],
        default="stacked",
        help="the layer layout: one scanned layer body (stacked; compiles fastest) or every layer unrolled "
        "(ssm_llm.unstack_layers; decodes faster on CPU, compiles longer)",
    )
    gen.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="auto",
        help="the weights of an attention model (converters.load(quantize=...)): auto (default) = w8a8-rot-emb "
        "where int8 products are faster than float32 on this CPU (measured once, recorded in the cache), "
        "float32 elsewhere; none = float32; int8 weights and per-token int8 activations (w8a8; w8a8-rot with "
        "Hadamard-rotated inputs: +0.5%% perplexity on SmolLM2 instead of +2.9%%; w8a8-rot-emb also an int8 "
        "embedding and output projection, its top logits refined by a 4-bit residual), or int8 / int4 weights "
        "only; a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks are kept exactly by w8a16 and (4-bit ones) w4a16",
    )
    gen.add_argument(
        "--no-cache",
        action="store_true",
        help=f"convert the model again instead of reading it from the cache ($SSM_LLM_CACHE, default "
        f"~/.cache/ssm_llm; {NO_CACHE_ENV}=1 does the same)",
    )
    gen.add_argument("--verbose", action="store_true", help="also print where the time went")
    gen.add_argument(
        "--mesh",
        type=_parse_mesh,
        metavar="DPxTP",
        help="shard the model over every device of the run: DP data-parallel x TP tensor-parallel (e.g. 1x3; "
        "TP must divide the heads; on one CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)",
    )
    gen.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="run as one of several processes (hosts) joined through jax.distributed; process 0 serves the "
        "coordination service at HOST:PORT and prints the text; every process runs the same command",
    )
    gen.add_argument("--num-processes", type=int, help="with --coordinator: how many processes")
    gen.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 to N-1")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="convert a checkpoint to an orbax ssm-llm checkpoint")
    conv.add_argument("source", help="GGUF file or Hugging Face model directory")
    conv.add_argument("dest", help="output directory")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="save quantized weights (as for generate; a quantized checkpoint then loads as it is, without "
        "quantizing on each run)",
    )
    conv.set_defaults(func=_convert)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", help="GGUF file, Hugging Face directory or ssm-llm checkpoint (default: SmolLM2)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-slots", type=int, default=8, help="requests decoded at once")
    srv.add_argument("--max-len", type=int, default=2048, help="the longest prompt + completion a request may ask for")
    srv.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    srv.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="as for generate, but float32 by default: a W8A8 model's rounding follows the batch's shape, so "
        "only float32 keeps every request's tokens equal to generating it alone",
    )
    srv.add_argument("--no-cache", action="store_true", help="convert the model again (as for generate)")
    srv.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="greedy requests speculate with up to N prompt-lookup draft tokens (attention models; 0: off); a step "
        "lets at most 7 ride for one decoding request, 3 each for two, none from eight on",
    )
    srv.add_argument(
        "--streaming-llm",
        type=int,
        default=0,
        metavar="BUDGET",
        help="every request keeps its first --streaming-sinks positions and its latest BUDGET - sinks ones once its "
        "prompt is in, and gives the pages between back to the pool for other requests (StreamingLLM at the tokens' "
        "own positions; attention models; 0: off); the pool keeps its size, so more long requests fit in it, at the "
        "cost of what falls out of the window",
    )
    srv.add_argument("--streaming-sinks", type=int, default=4, help="attention sinks kept with --streaming-llm")
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM before they are cancelled",
    )
    srv.set_defaults(func=_serve)

    cache = sub.add_parser(
        "cache", help="list or clear the converted models cached by generate (tokenizers and compiled programs stay)"
    )
    cache.add_argument("action", choices=["ls", "clear"])
    cache.set_defaults(func=_cache)
    return parser


def _cache(args) -> int:
    from converters import INT8_RECORD, model_cache
    from converters.cache_dir import cache_root
    from ssm_llm.memory import format_bytes

    if args.action == "clear":
        count, size = model_cache.clear()
        (cache_root() / INT8_RECORD).unlink(missing_ok=True)  # --quantize auto measures again
        print(f"removed {count} cached model(s), {format_bytes(size)}", file=sys.stderr)
        return 0
    found = model_cache.entries()
    for entry in found:
        options = ", ".join(f"{k}={v}" for k, v in (entry["options"] or {}).items())
        print(f"{format_bytes(entry['bytes']):>10}  {entry['path'].name}  {entry['source'] or '?'}  {options}")
    total = sum(e["bytes"] for e in found)
    print(f"{len(found)} cached model(s), {format_bytes(total)} in {model_cache.models_dir()}", file=sys.stderr)
    return 0


# Errors a user's input can cause (bad values, missing or unreadable files, a missing extra, memory):
# reported as one line, exit status 2. Anything else is a bug: one line naming it, exit status 1.
_EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError, MemoryError)
_DEBUG_ENV = "SSM_LLM_DEBUG"


def _debug() -> bool:
    return _env_flag(_DEBUG_ENV)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return (text + " ...") if len(lines) > 1 else text


def use_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache in `<cache root>/xla`, so a later process reuses the compiled
    programs. For the process entry points (`ssm-llm`, `python -m ssm_llm_cli`) only: it sets process-wide
    JAX options, which `main` called from Python leaves alone. Off with SSM_LLM_NO_CACHE=1."""
    if _env_flag(NO_CACHE_ENV):
        return
    import jax

    from converters.cache_dir import cache_root

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)


def run() -> None:
    """The console script: the persistent compilation cache on, then `main`'s exit status."""
    use_compilation_cache()
    _exit_now(main())


def _exit_now(status: int) -> NoReturn:
    """Leave the process without the interpreter's teardown of every module and of the XLA client, which
    takes 0.4-0.6 s on the 2-core CPU (of a 3 s cached `generate`): flush the output, wait for the threads
    that must finish (a background cache write), run the atexit handlers, then `os._exit`."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what a normal exit runs (logging's flush, JAX's clean-up), in the same order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`ssm-llm ... | head`) or a closed stream
            status = status or 1
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ssm-llm` console script: 0 on success, 2 for a bad input (one line on stderr,
    argparse's usage errors included), 1 for an unexpected error, 130 when interrupted. Set
    SSM_LLM_DEBUG=1 to see the traceback of any error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "system", None) is not None and not args.chat:
        parser.error("--system needs --chat (the system message goes into the chat template)")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ssm-llm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _debug():
            raise
        if isinstance(e, _EXPECTED_ERRORS):
            message = _one_line(e) or type(e).__name__
            print(
                f"ssm-llm: error: {'out of memory: ' if isinstance(e, MemoryError) else ''}{message}", file=sys.stderr
            )
            return 2
        print(
            f"ssm-llm: error: unexpected {type(e).__name__}: {_one_line(e)} (set {_DEBUG_ENV}=1 to see the traceback)",
            file=sys.stderr,
        )
        return 1
