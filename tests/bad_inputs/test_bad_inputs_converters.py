"""Bad and hostile inputs to the converters and the CLI (issue 18): each is refused with an error of the
right type that names the offending value, and refusing changes nothing on disk."""

import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits, tiny_hf_model, tiny_hf_ssm_model

import converters
import ssm_llm
from converters import checkpoint
from converters.hf_config import config_from_hf
from converters.safetensors_file import SafetensorsFile
from ssm_llm_cli import main


def snapshot(root) -> dict:
    """Every path under `root` with its content hash (None for directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("ssm-llm: error:")]


@pytest.fixture(scope="module")
def llama():
    """A tiny llama: (transformers model, its config dict, (config, params))."""
    model = tiny_hf_model("llama")
    return model, model.config.to_dict(), converters.load(model)


@pytest.fixture(scope="module")
def hf_dir(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    llama[0].save_pretrained(path)
    return path


@pytest.fixture
def no_load(monkeypatch):
    """Make the slow model load fail loudly: the checks under test must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("converters.load was called before the destination was checked")

    monkeypatch.setattr(converters, "load", load)


# ---------------------------------------------------------------- convert / save: no data loss


def test_convert_overwrite_refuses_an_unrelated_folder(hf_dir, tmp_path, capsys, no_load):
    dest = tmp_path / "my_documents"
    dest.mkdir()
    (dest / "thesis.txt").write_text("years of work")
    before = snapshot(tmp_path)
    assert main(["convert", str(hf_dir), str(dest), "--overwrite"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "my_documents" in line and "thesis.txt" in line and "not (only) an ssm_llm checkpoint" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["same", "dest_inside_source", "source_inside_dest"])
def test_convert_refuses_a_destination_that_overlaps_the_source(llama, tmp_path, capsys, no_load, layout):
    _, _, (config, params) = llama
    src = tmp_path / "outer" / "ckpt"
    checkpoint.save(params, config, src)  # an ssm_llm checkpoint: --overwrite alone would allow replacing it
    dest = {"same": src, "dest_inside_source": src / "params", "source_inside_dest": src.parent}[layout]
    before = snapshot(tmp_path)
    assert main(["convert", str(src), str(dest), "--overwrite"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"destination {dest.resolve()} overlaps the source {src.resolve()}" in line
    assert snapshot(tmp_path) == before


def test_convert_to_a_file_is_a_clear_error(hf_dir, tmp_path, capsys, no_load):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"keep me")
    assert main(["convert", str(hf_dir), str(dest), "--overwrite"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{dest} exists and is not a directory" in line
    assert dest.read_bytes() == b"keep me"


def test_convert_into_an_empty_dir_then_overwrite_the_checkpoint(llama, hf_dir, tmp_path, capsys):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    assert main(["convert", str(hf_dir), str(dest)]) == 0
    assert main(["convert", str(hf_dir), str(dest)]) == 2
    assert "already holds a checkpoint; pass --overwrite" in error_lines(capsys.readouterr().err)[0]
    assert main(["convert", str(hf_dir), str(dest), "--overwrite", "--dtype", "bfloat16"]) == 0
    config, params = checkpoint.load_checkpoint(dest)
    assert config == llama[2][0] and params["embed"].dtype == jnp.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging or backup directory left behind


class ExplodingTokenizer:
    def __init__(self, error):
        self.error = error

    def save_pretrained(self, path):
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_keeps_the_old_checkpoint(llama, tmp_path, error):
    _, _, (config, params) = llama
    dest = checkpoint.save(params, config, tmp_path / "ckpt")
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, params)
    with pytest.raises(type(error)):
        checkpoint.save(doubled, config, dest, overwrite=True, tokenizer=ExplodingTokenizer(error))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    np.testing.assert_array_equal(np.asarray(converters.load(dest)[1]["embed"]), np.asarray(params["embed"]))


def test_failed_swap_restores_the_old_checkpoint(llama, tmp_path, monkeypatch):
    _, _, (config, params) = llama
    dest = checkpoint.save(params, config, tmp_path / "ckpt")
    replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):  # moving the new checkpoint into place
            raise OSError("simulated failure")
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated failure"):
        checkpoint.save(params, config, dest, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert converters.load(dest)[0] == config


def test_save_overwrite_refuses_anything_but_a_checkpoint(llama, tmp_path):
    _, _, (config, params) = llama
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    ckpt = checkpoint.save(params, config, tmp_path / "ckpt")
    (ckpt / "NOTES.md").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"photos holds cat\.jpg, not \(only\) an ssm_llm checkpoint"):
        checkpoint.save(params, config, tmp_path / "photos", overwrite=True)
    with pytest.raises(FileExistsError, match=r"ckpt holds NOTES\.md"):
        checkpoint.save(params, config, ckpt, overwrite=True)
    with pytest.raises(FileExistsError, match="is not a directory"):
        checkpoint.save(params, config, tmp_path / "photos" / "cat.jpg", overwrite=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- shard indexes stay inside the directory


def _index_dir(tmp_path, hf_dir, shard_name):
    """A model directory whose safetensors index names `shard_name`; a real shard lies outside it."""
    model_dir = tmp_path / "models" / "m"
    model_dir.mkdir(parents=True)
    shutil.copy(hf_dir / "config.json", model_dir)
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "x.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard_name}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return model_dir


@pytest.mark.parametrize(
    "name",
    ["../../x.safetensors", "ABSOLUTE", "sub/../../../x.safetensors", "..\\..\\x.safetensors", "C:\\x.safetensors"],
)
def test_shard_index_cannot_point_outside_the_model(hf_dir, tmp_path, name):
    name = str(tmp_path / "x.safetensors") if name == "ABSOLUTE" else name
    model_dir = _index_dir(tmp_path, hf_dir, name)
    with pytest.raises(ValueError, match=rf"shard {re.escape(repr(name))} is outside the model directory"):
        converters.load(model_dir)


@pytest.mark.parametrize("name", [5, None, ["a.safetensors"], ""])
def test_shard_index_values_must_be_file_names(hf_dir, tmp_path, name):
    model_dir = _index_dir(tmp_path, hf_dir, name)
    with pytest.raises(ValueError, match=r"weight_map value .* is not a shard file name"):
        converters.load(model_dir)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x.safetensors"]}))
    with pytest.raises(ValueError, match="corrupt shard index; expected an object with a 'weight_map' object"):
        converters.load(model_dir)


def test_hub_cache_symlinked_shards_still_load(llama, tmp_path):
    """The hub cache keeps snapshots/<rev>/<file> as symlinks to ../../blobs/<hash>: those must load."""
    model, _, (_, params) = llama
    model.save_pretrained(tmp_path / "plain", max_shard_size="20KB")
    snapshot_dir = tmp_path / "snapshots" / "rev"
    snapshot_dir.mkdir(parents=True)
    (tmp_path / "blobs").mkdir()
    for i, path in enumerate(sorted((tmp_path / "plain").iterdir())):
        path.rename(tmp_path / "blobs" / f"blob{i}")
        (snapshot_dir / path.name).symlink_to(f"../../blobs/blob{i}")
    np.testing.assert_array_equal(np.asarray(converters.load(snapshot_dir)[1]["embed"]), np.asarray(params["embed"]))


# ---------------------------------------------------------------- safetensors headers, as the official reader


def _safetensors(path, header, data: bytes):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            {"a": _f32(0, 8), "b": _f32(0, 8)},
            bytes(8),
            r"tensor 'b' has data_offsets \[0, 8\], expected it to begin at 8",
        ),
        ({"a": _f32(0, 8), "b": _f32(4, 12)}, bytes(16), r"tensor 'b' has data_offsets \[4, 12\].*may not overlap"),
        ({"a": _f32(0, 8), "b": _f32(12, 20)}, bytes(20), r"tensor 'b' .* leave gaps"),
        ({"a": _f32(8, 0, (0,))}, bytes(8), r"tensor 'a' has data_offsets \[8, 0\]"),
        ({"a": _f32(-8, 0)}, bytes(8), r"tensor 'a' has data_offsets \[-8, 0\], expected \[begin, end\], ints >= 0"),
        ({"a": _f32(0, 8, (-2,))}, bytes(8), r"tensor 'a' has shape \[-2\], expected a list of ints >= 0"),
        ({"a": _f32(0, 8, ("2",))}, bytes(8), r"tensor 'a' has shape \['2'\]"),
        ({"a": _f32(0, 12)}, bytes(12), r"tensor 'a' offsets do not match its shape \(2,\)"),
        ({"a": _f32(0, 8)}, bytes(16), "8 bytes after the last tensor"),
        ([{"a": 1}], b"", "a JSON list, expected an object"),
        (
            b'{"a": ' + json.dumps(_f32(0, 8)).encode() + b', "a": ' + json.dumps(_f32(8, 16)).encode() + b"}",
            bytes(16),
            "name 'a' appears twice",
        ),
        ({"__metadata__": {"format": 1}, "a": _f32(0, 8)}, bytes(8), "__metadata__ must map names to strings"),
    ],
    ids=[
        "same_bytes",
        "overlap",
        "gap",
        "reversed",
        "negative_offset",
        "negative_dim",
        "string_dim",
        "size",
        "trailing_bytes",
        "list_header",
        "duplicate_name",
        "metadata",
    ],
)
def test_crafted_safetensors_are_refused_like_the_official_reader(tmp_path, header, data, message):
    from safetensors.numpy import load_file

    path = _safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(Exception):  # noqa: B017 - the official reader's own error type
        load_file(path)
    with pytest.raises(ValueError, match=message):
        SafetensorsFile(path)


def test_zero_size_tensors_tile_like_the_official_reader(tmp_path):
    from safetensors.numpy import load_file

    header = {"a": _f32(0, 8), "empty": _f32(8, 8, (0, 3)), "b": _f32(8, 16)}
    path = _safetensors(tmp_path / "ok.safetensors", header, np.arange(4, dtype=np.float32).tobytes())
    ours, official = SafetensorsFile(path), load_file(path)
    assert set(ours) == set(official)
    for name in official:
        np.testing.assert_array_equal(ours[name], official[name])


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(model_type="gpt_neox", architectures=["LlamaForCausalLM"]),
            "unknown architecture: model_type='gpt_neox'",
        ),
        (dict(model_type="mamba2x", architectures=["MambaForCausalLM"]), "unknown architecture: model_type='mamba2x'"),
        (dict(head_dim=0), "config.head_dim must be a positive int, got 0"),
        (dict(hidden_size="64"), r"config.hidden_size must be an int, got '64' \(str\)"),
        (dict(num_hidden_layers=True), r"config.num_hidden_layers must be an int, got True \(bool\)"),
        (dict(num_attention_heads=-6), "config.num_attention_heads must be a positive int, got -6"),
        (dict(num_key_value_heads=0), "config.num_key_value_heads must be a positive int, got 0"),
        (dict(vocab_size=None), "missing required key 'vocab_size'"),
        (dict(rms_norm_eps="abc"), r"config.rms_norm_eps must be a number, got 'abc' \(str\)"),
        (dict(eos_token_id="2"), r"config.eos_token_id must be token ids \(ints\), got the string '2'"),
        (dict(eos_token_id=[2, -1]), r"config.eos_token_id\[1\] must be an int >= 0, got -1"),
        (dict(bos_token_id=1.5), r"config.bos_token_id must be an int, got 1.5"),
        (dict(tie_word_embeddings="false"), "config.tie_word_embeddings must be true or false, got 'false'"),
        (dict(max_position_embeddings="2048"), "config.max_position_embeddings must be an int, got '2048'"),
        (dict(rope_scaling="linear"), "config.rope_scaling holds a str, expected a JSON object"),
        (dict(rope_parameters={"rope_type": "linear", "factor": "2"}), "config.factor must be a number, got '2'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope theta must be > 0, got 0.0"),
        (
            dict(sliding_window=4, layer_types=["full_attention", "linear_attention", "full_attention"]),
            "config.layer_types holds unsupported type.*'linear_attention'",
        ),
    ],
)
def test_bad_llama_configs(llama, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**llama[1], **change})


def test_layer_count_is_bounded_before_anything_per_layer_is_built(llama):
    for layers in (ssm_llm.config.MAX_LAYERS + 1, 2**70):
        with pytest.raises(ValueError, match=rf"config.num_hidden_layers must be at most 4096, got {layers}"):
            config_from_hf({**llama[1], "num_hidden_layers": layers, "sliding_window": 4})
    with pytest.raises(ValueError, match=r"config.num_layers must be an int in \[1, 4096\], got 5000"):
        config_from_hf({**tiny_hf_ssm_model("mamba").config.to_dict(), "num_hidden_layers": 5000})


def test_null_fields_mean_their_defaults(llama):
    assert config_from_hf({**llama[1], "hidden_act": None}) == llama[2][0]


def test_model_type_missing_falls_back_to_architectures(llama):
    d = {k: v for k, v in llama[1].items() if k != "model_type"}
    assert config_from_hf({**d, "architectures": ["LlamaForCausalLM"]}) == llama[2][0]
    with pytest.raises(ValueError, match=r"model_type=None, architectures=\['GPT2LMHeadModel'\]"):
        config_from_hf({**d, "architectures": ["GPT2LMHeadModel"]})


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "42"])
def test_config_json_that_is_not_an_object(hf_dir, tmp_path, content):
    model_dir = tmp_path / "m"
    shutil.copytree(hf_dir, model_dir)
    (model_dir / "config.json").write_text(content)
    with pytest.raises(ValueError, match=r"config.json holds a \w+, expected a JSON object"):
        converters.load(model_dir)
    with pytest.raises(ValueError, match="config holds a"):
        config_from_hf(json.loads(content))
    with pytest.raises(TypeError, match="config must be a transformers config or a dict, got list"):
        converters.load({"w": np.zeros(2)}, config=[1, 2])


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("mamba", dict(model_type="gpt_neox", architectures=["MambaForCausalLM"]), "model_type='gpt_neox'"),
        ("mamba", dict(state_size="16"), r"config.state_size must be an int, got '16'"),
        ("mamba", dict(expand="2"), r"config.expand must be a number, got '2'"),
        ("mamba", dict(time_step_rank="8"), r"config.time_step_rank must be an int, got '8'"),
        ("mamba", dict(use_bias="no"), "config.use_bias must be true or false, got 'no'"),
        ("mamba", dict(conv_kernel=0), "config.conv_kernel must be a positive int, got 0"),
        ("mamba", dict(eos_token_id=[0, "1"]), r"config.eos_token_id\[1\] must be an int, got '1'"),
        ("mamba", dict(layer_norm_epsilon="1e-5"), "config.layer_norm_epsilon must be a number, got '1e-5'"),
        ("mamba2", dict(head_dim=0), "config.head_dim must be a positive int, got 0"),
        ("mamba2", dict(n_groups=2.0), r"config.n_groups must be an int, got 2.0"),
        ("mamba2", dict(time_step_limit=[0.0, True]), "time_step_limit holds True, not a number"),
    ],
)
def test_bad_mamba_configs(kind, change, message):
    d = tiny_hf_ssm_model(kind).config.to_dict()
    with pytest.raises(ValueError, match=message):
        config_from_hf({**d, **change})


STATE_SPACES = {"d_model": 64, "n_layer": 2, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2", "headdim": 32}}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pad_vocab_size_multiple=0), "config.pad_vocab_size_multiple must be a positive int, got 0"),
        (dict(ssm_cfg=["Mamba2"]), "config.ssm_cfg holds a list, expected a JSON object"),
        (dict(ssm_cfg={"layer": "Mamba2", "headdim": 0}), "config.headdim must be a positive int, got 0"),
        (dict(d_model="64"), "config.d_model must be an int, got '64'"),
        (dict(tie_embeddings="yes"), "config.tie_embeddings must be true or false, got 'yes'"),
    ],
)
def test_bad_state_spaces_configs(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**STATE_SPACES, **change})


def _transformers4(d: dict, rope_theta: float, rope_scaling: dict) -> dict:
    """`d` rewritten as a transformers-4 config: top-level rope_theta and a rope_scaling dict."""
    d = {k: v for k, v in d.items() if k != "rope_parameters"}
    return {**d, "rope_theta": rope_theta, "rope_scaling": rope_scaling}


@pytest.mark.parametrize(
    "scaling, expected",
    [
        ({"type": "linear", "factor": 2.0}, ssm_llm.RopeConfig(theta=5e5, rope_type="linear", factor=2.0)),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            ssm_llm.RopeConfig(
                theta=5e5,
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        (None, ssm_llm.RopeConfig(theta=5e5)),
    ],
)
def test_transformers4_rope_config(llama, scaling, expected):
    assert config_from_hf(_transformers4(llama[1], 5e5, scaling)).rope == expected


def test_transformers4_linear_rope_logits_match_transformers():
    model = tiny_hf_model("llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    d = _transformers4(model.config.to_dict(), 10000.0, {"type": "linear", "factor": 4.0})
    config, params = converters.load(model.state_dict(), config=d)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    ours = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 16))[0][0]
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    unscaled = tiny_hf_model("llama")  # the same weights without scaling: the scaling must matter here
    assert np.abs(hf_logits(unscaled, ids) - ref).max() > 1e-2


# ---------------------------------------------------------------- tokenizer, pickles, padded vocabularies


def test_model_dir_without_tokenizer_files(llama, hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{hf_dir} holds no tokenizer: found none of tokenizer.json"):
        converters.load_tokenizer(hf_dir)
    _, _, (config, params) = llama
    ckpt = checkpoint.save(params, config, tmp_path / "ckpt")
    (ckpt / checkpoint.TOKENIZER_DIR).mkdir()
    with pytest.raises(FileNotFoundError, match=r"ckpt/tokenizer holds no tokenizer"):
        converters.load_tokenizer(ckpt)


def test_gguf_rotary_tensor_of_the_wrong_rank():
    from types import SimpleNamespace

    import gguf

    from converters.gguf_file import GGUFTensors

    bad = SimpleNamespace(
        name="blk.0.attn_q.weight",
        data=np.ones((1, 8, 8), np.float32),
        shape=(8, 8, 1),
        tensor_type=gguf.GGMLQuantizationType.F32,
    )
    tensors = GGUFTensors(SimpleNamespace(tensors=[bad]), {"self_attn.q_proj.weight": 4})
    with pytest.raises(
        ValueError,
        match=r"GGUF tensor 'blk.0.attn_q.weight' has shape \(1, 8, 8\); a rotary "
        r"projection needs \[rows\(, columns\)\]",
    ):
        tensors["model.layers.0.self_attn.q_proj.weight"]


def test_gguf_without_tokenizer_metadata(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    with pytest.raises(
        ValueError,
        match=r"bare.gguf holds no tokenizer: its metadata lacks tokenizer.ggml.model, "
        r"tokenizer.ggml.tokens",
    ):
        converters.load_tokenizer(path)


class _Payload:
    """Unpickling this runs `call(*args)`: what a malicious checkpoint would do."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("payload", ["os.system", "open"])
@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(hf_dir, tmp_path, payload, container):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(hf_dir / "config.json", model_dir)
    marker = tmp_path / "pwned"
    evil = (
        _Payload(os.system, (f"touch {shlex.quote(str(marker))}",))
        if payload == "os.system"
        else _Payload(open, (str(marker), "w"))
    )
    state = {"model.embed_tokens.weight": evil}
    if container == "torch.save":
        torch.save(state, model_dir / "pytorch_model.bin")
    else:
        (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot read PyTorch checkpoint"):
        converters.load(model_dir)
    assert not marker.exists()


def test_state_spaces_checkpoint_with_padded_vocabulary(tmp_path):
    """mamba_ssm pads the embedding rows to a multiple of pad_vocab_size_multiple (101 -> 104 here): the
    padded rows load, and the logits of the real vocabulary equal transformers' unpadded model. (Mamba-1
    only: the padding is read the same way for Mamba-2, whose layout test_ssm_converters covers.)"""
    model = tiny_hf_ssm_model("mamba", tie_word_embeddings=True)
    cfg = model.config
    ssm_cfg = {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand}
    (tmp_path / "config.json").write_text(
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
                "pad_vocab_size_multiple": 8,
                "tie_embeddings": True,
            }
        )
    )
    state = {k: v for k, v in model.state_dict().items() if k not in ("lm_head.weight", "backbone.embeddings.weight")}
    pad = 0.1 * torch.randn(104 - cfg.vocab_size, cfg.hidden_size)
    state["backbone.embedding.weight"] = torch.cat([model.backbone.embeddings.weight.detach(), pad])
    torch.save(state, tmp_path / "pytorch_model.bin")
    config, params = converters.load(tmp_path)
    assert config.vocab_size == 104
    np.testing.assert_array_equal(np.asarray(params["embed"][cfg.vocab_size :]), pad.numpy())
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    logits = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, 16))[0][0]
    assert logits.shape == (len(ids), 104)
    np.testing.assert_allclose(np.asarray(logits)[:, : cfg.vocab_size], hf_logits(model, ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- CLI: one line, never a traceback


def test_cli_missing_model_path(tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert error_lines(capsys.readouterr().err) == [f"ssm-llm: error: no checkpoint at {tmp_path / 'missing.gguf'}"]


def test_cli_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{tmp_path} has no config.json" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "hi", "--system", "be brief"], "--system needs --chat"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "abc"], "invalid int value: 'abc'"),
        (["convert", "a", "b", "--dtype", "int3"], "invalid choice: 'int3'"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "error, code, expected",
    [
        (
            PermissionError(13, "Permission denied", "/models/m/config.json"),
            2,
            "ssm-llm: error: [Errno 13] Permission denied: '/models/m/config.json'",
        ),
        (
            IsADirectoryError(21, "Is a directory", "/models/m/model.safetensors"),
            2,
            "ssm-llm: error: [Errno 21] Is a directory: '/models/m/model.safetensors'",
        ),
        (TypeError("cannot load a checkpoint from int"), 2, "ssm-llm: error: cannot load a checkpoint from int"),
        (MemoryError(), 2, "ssm-llm: error: out of memory: MemoryError"),
        (json.JSONDecodeError("Expecting value", "x", 0), 2, "ssm-llm: error: Expecting value: line 1 column 1"),
        (
            KeyError("layers"),
            1,
            "ssm-llm: error: unexpected KeyError: 'layers' (set SSM_LLM_DEBUG=1 to see the traceback)",
        ),
        (RuntimeError("line one\nline two"), 1, "ssm-llm: error: unexpected RuntimeError: line one ... (set"),
    ],
)
def test_cli_reports_every_error_in_one_line(tmp_path, capsys, monkeypatch, error, code, expected):
    def load(*args, **kwargs):
        raise error

    monkeypatch.setattr(converters, "load", load)
    monkeypatch.delenv("SSM_LLM_DEBUG", raising=False)
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path)]) == code
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(expected)
    monkeypatch.setenv("SSM_LLM_DEBUG", "1")  # then the traceback is shown
    with pytest.raises(type(error)):
        main(["generate", "--prompt", "hi", "--model", str(tmp_path)])


def test_cli_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(converters, "load", load)
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "ssm-llm: interrupted" and "Traceback" not in err
