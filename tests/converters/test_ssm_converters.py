"""Mamba / Mamba-2 converters: HF directories, original state-spaces checkpoints, orbax, CLI, strict errors."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits, tiny_hf_ssm_model
from test_converters import assert_same_params

import converters
import ssm_llm
from converters.hf_ssm_config import ssm_config_from_hf


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def ssm(request):
    model = tiny_hf_ssm_model(request.param)
    return model, converters.load(model)


def our_logits(config, params, ids):
    logits, _ = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 16))
    return np.asarray(logits[0])


def test_safetensors_directory(ssm, tmp_path):
    model, (config, params) = ssm
    model.save_pretrained(tmp_path)
    config2, params2 = converters.load(tmp_path)
    assert config2 == config
    assert_same_params(params, params2)


def test_in_memory_state_dict_and_config_dict(ssm):
    model, (config, params) = ssm
    config2, params2 = converters.load(model.state_dict(), config=model.config.to_dict())
    assert config2 == config
    assert_same_params(params, params2)


def test_orbax_round_trip(ssm, tmp_path):
    _, (config, params) = ssm
    out = converters.save(params, config, tmp_path / "ckpt")
    config2, params2 = converters.load(out)
    assert config2 == config and type(config2) is type(config)
    assert_same_params(params, params2)


def _state_spaces_checkpoint(model, path):
    """Write `model` the way mamba_ssm does: config.json (d_model, n_layer, ssm_cfg), pytorch_model.bin with
    `backbone.embedding.weight` and no separate head (tied)."""
    cfg = model.config
    ssm_cfg = {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand}
    if cfg.model_type == "mamba2":
        ssm_cfg.update(layer="Mamba2", headdim=cfg.head_dim, ngroups=cfg.n_groups, chunk_size=cfg.chunk_size)
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "d_model": cfg.hidden_size,
                "d_intermediate": 0,
                "n_layer": cfg.num_hidden_layers,
                "vocab_size": cfg.vocab_size,
                "ssm_cfg": ssm_cfg,
                "rms_norm": True,
                "residual_in_fp32": True,
                "fused_add_norm": True,
                "pad_vocab_size_multiple": 1,
                "tie_embeddings": True,
            }
        )
    )
    state = {
        ("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    torch.save(state, path / "pytorch_model.bin")


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_state_spaces_checkpoint(kind, tmp_path):
    model = tiny_hf_ssm_model(kind, tie_word_embeddings=True)
    _state_spaces_checkpoint(model, tmp_path / "orig")
    config, params = converters.load(tmp_path / "orig")
    assert config.family == kind and config.tie_word_embeddings and "lm_head" not in params
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    np.testing.assert_allclose(our_logits(config, params, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_state_spaces_vocab_padding_and_unsupported_options():
    base = {"d_model": 64, "n_layer": 2, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2", "headdim": 32}}
    config = ssm_config_from_hf(base)
    assert config.vocab_size == 50280 and config.num_heads == 4 and config.n_groups == 1
    with pytest.raises(ValueError, match="d_intermediate > 0"):
        ssm_config_from_hf({**base, "d_intermediate": 128})
    with pytest.raises(ValueError, match="unknown state-spaces ssm_cfg layer 'Mamba3'"):
        ssm_config_from_hf({**base, "ssm_cfg": {"layer": "Mamba3"}})
    with pytest.raises(ValueError, match="not a multiple of headdim 48"):
        ssm_config_from_hf({**base, "ssm_cfg": {"layer": "Mamba2", "headdim": 48}})


@pytest.mark.parametrize(
    "limit, expected",
    [
        (None, (0.0, math.inf)),
        ([0.0, {"__float__": "Infinity"}], (0.0, math.inf)),
        ([0.001, "Infinity"], (0.001, math.inf)),
        ((0.0, 0.1), (0.0, 0.1)),
    ],
)
def test_time_step_limit_parsing(limit, expected):
    d = tiny_hf_ssm_model("mamba2").config.to_dict()
    d["time_step_limit"] = limit
    assert ssm_config_from_hf(d).time_step_limit == expected


def test_time_step_limit_written_by_transformers_round_trips(tmp_path):
    model = tiny_hf_ssm_model("mamba2", time_step_limit=(0.0, float("inf")))
    model.config.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text(), parse_constant=lambda c: {"__float__": c})
    assert ssm_config_from_hf(d).time_step_limit == (0.0, math.inf)


# ---------------------------------------------------------------- strictness


def test_shape_mismatch(ssm):
    model, _ = ssm
    cfg = {**model.config.to_dict(), "state_size": 4}
    with pytest.raises(ValueError, match=r"tensor 'backbone.layers.0.mixer.[\w.]+' has shape \(.*\), expected \(.*\)"):
        converters.load(model.state_dict(), config=cfg)


def test_missing_and_unused_tensors(ssm):
    model, _ = ssm
    state = dict(model.state_dict())
    del state["backbone.layers.1.mixer.D"]
    with pytest.raises(ValueError, match=r"missing tensor 'backbone.layers.1.mixer.D'"):
        converters.load(state, config=model.config)
    state = {**model.state_dict(), "backbone.layers.0.mixer.extra": torch.ones(3)}
    with pytest.raises(ValueError, match=r"1 unused tensor.*'backbone.layers.0.mixer.extra'"):
        converters.load(state, config=model.config)


def test_both_embedding_names_is_an_error(ssm):
    model, _ = ssm
    state = dict(model.state_dict())
    state["backbone.embedding.weight"] = state["backbone.embeddings.weight"]
    with pytest.raises(ValueError, match="both 'backbone.embedding.weight' and 'backbone.embeddings.weight'"):
        converters.load(state, config=model.config)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_heads=5), r"num_heads \* head_dim \(5 \* 16\) must equal intermediate_size \(96\)"),
        (dict(n_groups=4), r"num_heads \(6\) must be a multiple of n_groups \(4\)"),
        (dict(time_step_limit=[0.0]), r"time_step_limit must be a pair"),
        (dict(time_step_limit=[0.0, "lots"]), r"time_step_limit holds 'lots', not a number"),
        (dict(time_step_limit=[0.5, 0.1]), r"time_step_limit must be \(lo, hi\) with 0 <= lo <= hi"),
        (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
        (dict(chunk_size=0), r"chunk_size must be a positive int"),
    ],
)
def test_bad_mamba2_configs(change, message):
    model = tiny_hf_ssm_model("mamba2")
    with pytest.raises(ValueError, match=message):
        converters.load(model.state_dict(), config={**model.config.to_dict(), **change})


def test_missing_config_key():
    model = tiny_hf_ssm_model("mamba")
    cfg = model.config.to_dict()
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['hidden_size'\]"):
        converters.load(model.state_dict(), config=cfg)


# ---------------------------------------------------------------- CLI


def _word_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_cli_generate_from_a_mamba_directory(kind, tmp_path):
    model = tiny_hf_ssm_model(kind)
    model.config.eos_token_id = None  # let the run go to max_new_tokens
    model.save_pretrained(tmp_path)
    tokenizer = _word_tokenizer(model.config.vocab_size)
    tokenizer.save_pretrained(tmp_path)
    config, params = converters.load(tmp_path)
    ids = tokenizer("w3 w1 w4 w1 w5").input_ids
    expected = ssm_llm.generate(
        params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=12, eos_token_ids=())
    ).tokens[0]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssm_llm_cli",
            "generate",
            "--model",
            str(tmp_path),
            "--prompt",
            "w3 w1 w4 w1 w5",
            "--max-new-tokens",
            "12",
            "--no-stream",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "5 prompt tokens, 12 new (length)" in result.stderr
