"""Converters: every source kind gives the same params; strict errors name the bad tensor."""

import json
import subprocess
import sys
import textwrap

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits, tiny_hf_model

import converters
import ssm_llm
from converters.gguf_file import hf_tensor_name


def flat(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_same_params(a, b):
    a, b = flat(a), flat(b)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def llama():
    model = tiny_hf_model("llama")
    return model, converters.load(model)


def test_in_memory_state_dict_and_config(llama):
    model, (config, params) = llama
    config2, params2 = converters.load(model.state_dict(), config=model.config)
    assert config2 == config
    assert_same_params(params, params2)
    config3, _ = converters.load(model.state_dict(), config=model.config.to_dict())
    assert config3 == config


def test_safetensors_directory(llama, tmp_path):
    model, (config, params) = llama
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config2, params2 = converters.load(tmp_path)
    assert config2 == config
    assert_same_params(params, params2)


def test_sharded_safetensors_directory(llama, tmp_path):
    model, (config, params) = llama
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_params(params, converters.load(tmp_path)[1])


def test_bf16_safetensors_directory(tmp_path):
    model = tiny_hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, params = converters.load(tmp_path)
    expected = model.model.layers[1].self_attn.k_proj.bias.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["bk"][1]), expected)
    assert params["embed"].dtype == jnp.float32


def test_pytorch_bin_directory(llama, tmp_path):
    model, (config, params) = llama
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_params(params, converters.load(tmp_path)[1])


def test_bfloat16_params(llama):
    model, (config, params) = llama
    _, p16 = converters.load(model, dtype=jnp.bfloat16)
    assert p16["layers"]["wq"].dtype == jnp.bfloat16
    logits, _ = ssm_llm.forward(p16, config, jnp.asarray([[1, 2, 3]]), ssm_llm.init_cache(config, 1, 8, jnp.bfloat16))
    ref = hf_logits(model, [1, 2, 3])
    assert np.abs(np.asarray(logits[0], np.float32) - ref).max() < 0.1 * np.abs(ref).max()


def test_orbax_round_trip(llama, tmp_path):
    model, (config, params) = llama
    out = converters.save(params, config, tmp_path / "ckpt")
    config2, params2 = converters.load(out)
    assert config2 == config
    assert_same_params(params, params2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        converters.save(params, config, out)
    converters.save(params, config, out, overwrite=True)
    unstacked = ssm_llm.unstack_layers(params)
    converters.save(unstacked, config, out, overwrite=True)
    assert_same_params(unstacked, converters.load(out)[1])


def test_orbax_load_needs_no_torch(llama, tmp_path):
    model, (config, params) = llama
    converters.save(params, config, tmp_path / "ckpt")
    ids = [3, 1, 4, 1, 5]
    expected = hf_logits(model, ids)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, BlockTorch())
        import numpy as np, jax.numpy as jnp
        import converters, ssm_llm
        config, params = converters.load({str(tmp_path / "ckpt")!r})
        logits, _ = ssm_llm.forward(params, config, jnp.asarray([{ids}]), ssm_llm.init_cache(config, 1, 8))
        np.testing.assert_allclose(np.asarray(logits[0]), np.load({str(tmp_path / "expected.npy")!r}), atol=1e-4)
        assert "torch" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- strictness


def test_missing_tensor(llama):
    model, _ = llama
    state = dict(model.state_dict())
    del state["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.2.mlp.up_proj.weight'"):
        converters.load(state, config=model.config)


def test_unused_tensor(llama):
    model, _ = llama
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    with pytest.raises(ValueError, match=r"1 unused tensor.*'model.layers.0.self_attn.q_norm.weight'"):
        converters.load(state, config=model.config)


def test_extra_layer_is_unused(llama):
    model, _ = llama
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = 2
    with pytest.raises(ValueError, match=r"unused tensor.*model.layers.2"):
        converters.load(model.state_dict(), config=cfg)


def test_shape_mismatch(llama):
    model, _ = llama
    cfg = model.config.to_dict()
    cfg["intermediate_size"] = 96
    with pytest.raises(
        ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(80, 48\), expected \(96, 48\)"
    ):
        converters.load(model.state_dict(), config=cfg)


def test_tied_head_that_differs(llama):
    model, _ = llama
    cfg = model.config.to_dict()
    cfg["tie_word_embeddings"] = True
    with pytest.raises(ValueError, match="tie_word_embeddings is set but tensor 'lm_head.weight' differs"):
        converters.load(model.state_dict(), config=cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unknown architecture: model_type='gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "unsupported rope_type 'yarn'"),
        (dict(num_key_value_heads=4), r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
        (dict(vocab_size=0), "config.vocab_size must be a positive int"),
    ],
)
def test_bad_configs(llama, change, message):
    model, _ = llama
    with pytest.raises(ValueError, match=message):
        converters.load(model.state_dict(), config={**model.config.to_dict(), **change})


def test_missing_config_key(llama):
    model, _ = llama
    cfg = model.config.to_dict()
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        converters.load(model.state_dict(), config=cfg)


def test_truncated_safetensors(llama, tmp_path):
    model, _ = llama
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated file; tensor"):
        converters.load(tmp_path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        converters.load(tmp_path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        converters.load(tmp_path)


def test_corrupt_pytorch_bin(llama, tmp_path):
    model, _ = llama
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="cannot read PyTorch checkpoint"):
        converters.load(tmp_path)


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        converters.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        converters.load(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="invalid JSON"):
        converters.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        converters.load(tmp_path)
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        converters.load(tmp_path / "weights.txt")
    with pytest.raises(ValueError, match="needs its config"):
        converters.load({"a": np.zeros(3)})
    with pytest.raises(TypeError, match="cannot load a checkpoint from int"):
        converters.load(42)


# ---------------------------------------------------------------- GGUF written here from a tiny model


def write_gguf(path, model, arch: str, quantize_embedding: bool = False, tensor_hook=None):
    """Write `model` as llama.cpp would: its tensor names, metadata, and q/k rows permuted for llama.
    tensor_hook(gguf_name, float array) may return (raw block bytes, GGUF type) to store a tensor quantized."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_eos_token_id(7)
    to_gguf = {
        hf_tensor_name(g): g
        for g in ["token_embd.weight", "output_norm.weight", "output.weight"]
        + [
            f"blk.{i}.{s}"
            for i in range(cfg.num_hidden_layers)
            for s in (
                "attn_norm.weight",
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "attn_output.weight",
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            )
        ]
    }
    hd = cfg.hidden_size // cfg.num_attention_heads
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            array = array.reshape(heads, 2, hd // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        hooked = tensor_hook(to_gguf[name], array) if tensor_hook is not None else None
        if hooked is not None:
            writer.add_tensor(to_gguf[name], hooked[0], raw_dtype=hooked[1])
        elif quantize_embedding and name == "model.embed_tokens.weight":
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(to_gguf[name], q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(to_gguf[name], np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_in_memory_model(arch, tmp_path):
    model = tiny_hf_model(arch, hidden_size=96, intermediate_size=64)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, arch)
    config, params = converters.load(path)
    ref_config, ref_params = converters.load(model)
    assert config.eos_token_ids == (7,)
    assert config.qkv_bias == (arch == "qwen2")
    for field in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_layers", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(ref_config, field)
    assert_same_params(params, ref_params)


def test_gguf_quantized_tensor_is_dequantized(tmp_path):
    model = tiny_hf_model("llama", hidden_size=96, intermediate_size=64)
    path = tmp_path / "q8.gguf"
    write_gguf(path, model, "llama", quantize_embedding=True)
    _, params = converters.load(path)
    embed = model.model.embed_tokens.weight.detach().numpy()
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    np.testing.assert_array_equal(np.asarray(params["embed"]), expected)
    assert np.abs(expected - embed).max() < np.abs(embed).max() / 100


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        converters.load(path)


def test_truncated_real_gguf(tmp_path):
    real = ssm_llm.default_model_path().read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(real[: len(real) // 2])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        converters.load(path)


def test_gguf_unknown_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        converters.load(path)
