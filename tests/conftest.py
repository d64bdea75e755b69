"""Shared fixtures: tiny random Hugging Face models (no download) and the real SmolLM2 GGUF."""

import atexit
import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _run_cache() -> str:
    """A temporary cache for this test run, shared by pytest-xdist's workers: they are children of the
    controller process, whose pid names it, so the SmolLM2 tokenizer (~12 s of pure Python from the GGUF
    metadata) and converted models are built once per run instead of once per worker, as two processes
    sharing a user's cache would (its writes are atomic renames). The process that names it removes it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = os.path.join(tempfile.gettempdir(), f"ssm_llm_test_cache_{os.getppid() if worker else os.getpid()}")
    os.makedirs(path, exist_ok=True)
    if not worker:
        atexit.register(shutil.rmtree, path, True)
    return path


# Converted models, tokenizers and compiled programs go to a temporary cache, never the user's.
os.environ["SSM_LLM_CACHE"] = _run_cache()
# JAX's persistent compilation cache in the same place the CLI keeps it (`<cache root>/xla`), for this process and
# every child (notebook kernels, sharded and multi-process runs), every program however small: each test module
# ends with `jax.clear_caches()` (below), and the next modules compile many of the same tiny-model programs again.
# Measured on the 2-core EPYC: tests/speculative 162 s instead of 177 s from an empty cache (81 s from a full one).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["SSM_LLM_CACHE"], "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# XLA's CPU compiler with its older fusion emitters, in this process and every child: the tests compile thousands of
# small programs and run each a few times, and the older emitters compile them much faster (the same operations;
# floating-point results may differ in the last bit, e.g. where a multiply-add is contracted).
# Measured on the 2-core EPYC, JAX 0.10.2: tiny Llama / Mamba / Mamba-2 `generate` programs 5.3-6.1 s instead of
# 9.9-10.0 s; tests/models/test_attention_models.py 43 s instead of 56 s; the whole CI run 1107 s instead of 1508 s.
# Not in the run of the `optimized_xla` tests (the Makefile's second pytest run, SSM_LLM_TEST_XLA=production): they
# run the real model as users do, so they keep XLA's default CPU compiler.
if os.environ.get("SSM_LLM_TEST_XLA") != "production":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
# quantize="auto" (the CLI's default) decided as on a CPU where int8 does not pay, so outputs do not depend on the
# CI host's CPU; the tests of the choice itself set or delete it (tests/converters/test_int8_choice.py).
os.environ["SSM_LLM_INT8"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module. One pytest process compiles thousands of
    XLA CPU executables; kept alive, the grown suite twice crashed with a segfault inside XLA's CPU
    compiler late in the run (root cause not established), and passed with this cleanup."""
    yield
    import jax

    jax.clear_caches()


@contextlib.contextmanager
def _optimizations_off():
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True, scope="module")
def _cheap_compiles(request):
    """XLA without most optimizations, for every module not marked `optimized_xla`. Almost every test runs
    each compiled program for a few tiny steps, so compiling dominates: off, compiling is ~1.5-3x faster on
    a CPU with the same semantics (measured: tests/models took 151 s instead of 204 s, all passing). Modules
    that run the real 135M model for many steps are marked `optimized_xla` (there the run time dominates and
    unoptimized programs were slower: test_speculative_smollm2 took 83 s instead of 54 s)."""
    if request.node.get_closest_marker("optimized_xla") or os.environ.get("SSM_LLM_TEST_XLA") == "production":
        yield  # (a test-level mark is not seen by this module-level fixture: make test's production run covers it)
        return
    with _optimizations_off():
        yield


TINY = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random `transformers` causal LM (float32, eval mode) of the given kind."""
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # default init gives near-uniform logits; widen them so argmax is robust
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.15)
            else:
                p.normal_(0.0, 0.05)
    return model


def save_word_level_tokenizer(directory):
    """A whitespace word-level tokenizer of the tiny models' 128 ids ("w0" ... "w126"), saved to `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"<unk>": 127}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>").save_pretrained(directory)


TINY_SSM = dict(vocab_size=101, hidden_size=48, state_size=8, num_hidden_layers=3, expand=2)


def tiny_hf_ssm_model(kind: str = "mamba", seed: int = 0, **overrides):
    """A tiny random `transformers` Mamba (kind "mamba") or Mamba-2 ("mamba2") causal LM, float32, eval.

    Mamba-2 defaults: 6 heads of 16 channels, 2 groups, chunk size 8.
    """
    import torch
    import transformers

    if kind == "mamba":
        config = transformers.MambaConfig(**{**TINY_SSM, **overrides})
        model_cls = transformers.MambaForCausalLM
    else:
        config = transformers.Mamba2Config(
            **{**TINY_SSM, "num_heads": 6, "head_dim": 16, "n_groups": 2, "chunk_size": 8, **overrides}
        )
        model_cls = transformers.Mamba2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # widen the default init (keeping the structured SSM parameters) so argmax is robust
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias")):
                continue
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15)
            else:
                p.normal_(0.0, 0.05)
    return model


def hf_logits(model, ids) -> np.ndarray:
    """Full-sequence logits `[T, V]` of one prompt from a transformers model."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(model, ids, n: int) -> list[int]:
    """`n` greedy new tokens from transformers' own generate (no EOS stop)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(ids)]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="session")
def smollm2():
    """(config, params, tokenizer, path) of the real SmolLM2-135M-Instruct GGUF."""
    import converters
    import ssm_llm

    path = ssm_llm.default_model_path()
    config, params = converters.load(path, cache=True)  # converted by the first worker, read by the other
    return config, params, converters.load_tokenizer(path), path


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own float32 SmolLM2, loaded from the same GGUF by its GGUF integration."""
    import torch
    from transformers import AutoModelForCausalLM

    import ssm_llm

    path = ssm_llm.default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizers():
    """SmolLM2's real byte-level BPE tokenizer (49152 tokens) and llguidance's view of it, built once."""
    import converters
    import ssm_llm
    from ssm_llm import constraints

    hf = converters.load_tokenizer(ssm_llm.default_model_path())
    return hf, constraints.tokenizer(hf)


def tiny_over_smollm2_vocab(family: str = "llama"):
    """A tiny random model's config over SmolLM2's vocabulary (49152 tokens): its choices are arbitrary, so in
    the constraint tests only the grammar keeps outputs valid."""
    import ssm_llm

    if family == "llama":
        return ssm_llm.ModelConfig(
            vocab_size=49152,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            max_position_embeddings=256,
        )
    return ssm_llm.Mamba2Config(
        vocab_size=49152,
        hidden_size=32,
        num_layers=2,
        state_size=8,
        intermediate_size=64,
        num_heads=4,
        head_dim=16,
        chunk_size=8,
    )
