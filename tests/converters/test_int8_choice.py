"""The backend choice of integer inference: `ssm_llm.int8_choice` (a one-time measurement of int8 against
float32 products, recorded on disk per CPU and JAX version), the presets of `converters.load(quantize=...)`,
`quantize="auto"` and the CLI's default `--quantize auto`."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import save_word_level_tokenizer, tiny_hf_model, tiny_hf_ssm_model

import converters
from pallas_kernels import cpu_attention
from ssm_llm import int8_choice
from ssm_llm.int8_blocks import unblock_int8_weights
from ssm_llm.int8_choice import PAYS_AT, Int8Choice
from ssm_llm.quant import quantize_weights
from ssm_llm.quant.presets import PRESETS, preset, preset_of
from ssm_llm_cli import main


def assert_same(a, b):
    # (W8A8 loads come in the CPU kernel's blocked layout where it runs: compared in the plain one)
    (config_a, params_a), (config_b, params_b) = a, b
    params_a, params_b = unblock_int8_weights(params_a), unblock_int8_weights(params_b)
    assert config_a == config_b
    assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def host_choice(float32_ms: float, int8_ms: float) -> Int8Choice:
    model, flags, versions, cores, machine = int8_choice._host_key()
    return Int8Choice(model, flags, versions, float32_ms, int8_ms, cores, machine)


@pytest.fixture
def measurements(monkeypatch):
    """Replaces the timing with a fake one (int8 twice as fast) and counts the measurements taken."""
    taken = []

    def fake(*args, **kwargs):
        taken.append(1)
        return host_choice(2.0, 1.0)

    monkeypatch.setattr(int8_choice, "measure", fake)
    return taken


def test_measure_times_both_products_on_this_host():
    choice = int8_choice.measure(repeats=3, k=64, n=128, count=2)
    assert choice.float32_ms > 0 and choice.int8_ms > 0 and choice.matches_host()
    assert choice.speedup == choice.float32_ms / choice.int8_ms
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        int8_choice.measure(repeats=0)


def test_pays_from_the_threshold_and_only_on_a_cpu_backend(tmp_path, measurements, monkeypatch):
    assert not host_choice(1.0, 1.0).pays and host_choice(PAYS_AT, 1.0).pays
    monkeypatch.delenv("SSM_LLM_INT8")
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    assert converters.int8_decision() == (True, "int8 products 2.00x float32's on this CPU")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert converters.int8_decision() == (False, "a gpu backend")


def test_the_record_is_reused_on_this_host_and_measured_again_elsewhere(tmp_path, measurements):
    record = tmp_path / "sub" / "record.json"
    first = int8_choice.int8_choice(record)
    assert len(measurements) == 1 and int8_choice.read_record(record) == first
    assert int8_choice.int8_choice(record) == first and len(measurements) == 1  # read, not measured
    others = (
        ("cpu", "another CPU"),
        ("jax_version", "0.0.1/0.0.1"),
        ("flags", ["avx2"]),
        ("cores", 96),
        ("machine", "arm64"),
    )
    for field, other in others:
        record.write_text(json.dumps({**dataclasses.asdict(first), field: other}))
        assert int8_choice.int8_choice(record) == first  # another host's record: measured again, replaced
    assert len(measurements) == 1 + len(others) and int8_choice.read_record(record) == first
    record.write_text(json.dumps({**dataclasses.asdict(first), "from_a_later_version": 1}))
    assert int8_choice.int8_choice(record) == first and len(measurements) == 1 + len(others)  # extra keys: read
    for damaged in ("{", "[]", json.dumps({"cpu": "x"}), json.dumps({**dataclasses.asdict(first), "int8_ms": 0})):
        record.write_text(damaged)
        assert int8_choice.read_record(record) is None
        assert int8_choice.int8_choice(record) == first
    assert len(measurements) == 5 + len(others)
    assert [p.name for p in record.parent.iterdir()] == ["record.json"]  # no temporary files left


def test_presets_name_their_configs():
    config, params = converters.load(tiny_hf_model("llama"))
    assert preset_of(config) is None
    for name in PRESETS:
        scheme, options = preset(name)
        _, qconfig = quantize_weights(params, config, scheme, **options)
        assert preset_of(qconfig) == name
    with pytest.raises(ValueError, match="quantize must be None, 'auto' or one of w8a8, w8a8-rot"):
        preset("int8")


def test_auto_loads_the_rotated_int8_model_where_int8_pays(monkeypatch, tmp_path, measurements):
    model = tiny_hf_model("llama")
    config, params = converters.load(model)
    expected = quantize_weights(params, config, "w8a8", rotation=True, embedding=True, head_residual=True)[::-1]
    monkeypatch.setenv("SSM_LLM_INT8", "1")
    assert_same(converters.load(model, quantize="auto"), expected)
    assert_same(converters.load(model, quantize="w8a8-rot-emb"), expected)
    monkeypatch.setenv("SSM_LLM_INT8", "0")
    assert_same(converters.load(model, quantize="auto"), (config, params))
    monkeypatch.setenv("SSM_LLM_INT8", "yes")
    with pytest.raises(ValueError, match=r"\$SSM_LLM_INT8 must be 0 or 1"):
        converters.load(model, quantize="auto")
    assert measurements == []  # the variable decides without measuring
    monkeypatch.delenv("SSM_LLM_INT8")
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    assert_same(converters.load(model, quantize="auto"), expected)  # measured (int8 twice as fast): int8
    assert len(measurements) == 1 and (tmp_path / "cache" / converters.INT8_RECORD).is_file()
    converters.load(model, quantize="auto")
    assert len(measurements) == 1  # recorded


def test_auto_keeps_mamba_models_and_quantized_checkpoints(monkeypatch, tmp_path):
    monkeypatch.setenv("SSM_LLM_INT8", "1")
    mamba = tiny_hf_ssm_model("mamba2")
    assert_same(converters.load(mamba, quantize="auto"), converters.load(mamba))
    with pytest.raises(ValueError, match="quantize= applies to attention models"):
        converters.load(mamba, quantize="w8a8-rot")
    config, params = converters.load(tiny_hf_model("llama"), quantize="w8a16")
    converters.save(params, config, tmp_path / "ckpt")
    assert converters.load(tmp_path / "ckpt", quantize="auto")[0].quantization == "w8a16"
    with pytest.raises(ValueError, match=r"already quantized \('w8a16'\); quantize='w8a8-rot' needs the float"):
        converters.load(tmp_path / "ckpt", quantize="w8a8-rot")
    config, params = converters.load(tiny_hf_model("llama"), quantize="w8a8-rot")
    converters.save(params, config, tmp_path / "rot")
    assert converters.load(tmp_path / "rot", quantize="w8a8")[0].activation_rotation  # a scheme accepts its variants
    with pytest.raises(ValueError, match="group_size='native' keeps a file's own codes"):
        converters.load(tmp_path / "rot", quantize="w8a8-rot", group_size="native")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        converters.load(tmp_path / "missing.gguf", quantize="auto")


def test_a_mamba_entry_written_under_auto_is_refused_to_a_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("SSM_LLM_INT8", "1")
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "mamba"
    tiny_hf_ssm_model("mamba").save_pretrained(source)
    assert_same(converters.load(source, cache=True, quantize="auto"), converters.load(source))
    with pytest.raises(ValueError, match="quantize= applies to attention models"):
        converters.load(source, cache=True, quantize="w8a8-rot-emb")


def test_auto_is_cached_as_its_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("SSM_LLM_INT8", "1")
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(source)
    calls = []
    real = converters._convert
    monkeypatch.setattr(converters, "_convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = converters.load(source, cache=True, quantize="auto")
    assert_same(converters.load(source, cache=True, quantize="w8a8-rot-emb"), first)  # the same entry
    assert len(calls) == 1 and first[0].int8_embedding and first[0].activation_rotation


def test_cli_generate_defaults_to_auto(monkeypatch, tmp_path, capsys):
    source = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(source)
    save_word_level_tokenizer(source)
    argv = ["generate", "--model", str(source), "--prompt", "w3 w1 w4", "--max-new-tokens", "5", "--no-cache"]
    monkeypatch.setenv("SSM_LLM_INT8", "1")
    assert main(argv) == 0
    auto_out, err = capsys.readouterr()
    assert "[--quantize auto: w8a8-rot-emb ($SSM_LLM_INT8=1; --quantize none for float32)]" in err
    assert main([*argv, "--quantize", "w8a8-rot-emb"]) == 0
    assert capsys.readouterr().out == auto_out
    # Speculation is exact on W8A8 through the CPU attention kernel: auto keeps W8A8 and the same text...
    assert main([*argv, "--speculative", "prompt_lookup"]) == 0
    spec_out, err = capsys.readouterr()
    assert "[--quantize auto: w8a8-rot-emb" in err and spec_out == auto_out
    # ...and loads float32 where the kernel cannot run.
    with monkeypatch.context() as patch:
        patch.setattr(cpu_attention, "runs_here", lambda rows: False)
        assert main([*argv, "--speculative", "prompt_lookup"]) == 0
    spec_float_out, err = capsys.readouterr()
    assert "[--quantize auto: float32 (--speculative is exact on W8A8 weights only through the CPU attention" in err
    monkeypatch.setenv("SSM_LLM_INT8", "0")
    assert main(argv) == 0
    float_out, err = capsys.readouterr()
    assert "[--quantize auto: float32 ($SSM_LLM_INT8=0)]" in err and spec_float_out == float_out
    assert main([*argv, "--quantize", "none"]) == 0
    none_out, err = capsys.readouterr()
    assert none_out == float_out and "--quantize auto" not in err


def test_cli_measures_once_and_cache_clear_forgets_the_measurement(monkeypatch, tmp_path, capsys, measurements):
    monkeypatch.delenv("SSM_LLM_INT8")
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(source)
    save_word_level_tokenizer(source)
    argv = ["generate", "--model", str(source), "--prompt", "w3 w1 w4", "--max-new-tokens", "3", "--no-cache"]
    for _ in range(2):
        assert main(argv) == 0
        assert "[--quantize auto: w8a8-rot-emb (int8 products 2.00x float32's on this CPU;" in capsys.readouterr().err
    assert len(measurements) == 1
    assert main(["cache", "clear"]) == 0 and not (tmp_path / "cache" / converters.INT8_RECORD).exists()
    assert main(argv) == 0 and len(measurements) == 2


def test_cli_convert_saves_a_quantized_checkpoint_that_auto_keeps(monkeypatch, tmp_path, capsys):
    source = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(source)
    save_word_level_tokenizer(source)
    assert main(["convert", str(source), str(tmp_path / "ckpt"), "--quantize", "w8a8-rot-emb"]) == 0
    config, _ = converters.load(tmp_path / "ckpt")
    assert preset_of(config) == "w8a8-rot-emb"
    monkeypatch.setenv("SSM_LLM_INT8", "0")  # auto keeps a quantized checkpoint whatever it would choose
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "w3 w1", "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert "[--quantize auto: the checkpoint's own w8a8-rot-emb weights, kept]" in capsys.readouterr().err
