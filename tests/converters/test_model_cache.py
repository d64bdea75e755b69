"""The converted-model cache (`converters.load(..., cache=True)`, `converters.model_cache`): a miss converts
and writes an entry, a hit reads it and gives the very params of an uncached load; a changed source, other
options, a damaged entry and an unwritable cache; content digests remembered by stat; `ssm-llm cache`."""

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_word_level_tokenizer, tiny_hf_model

import converters
from converters import cache_dir, model_cache
from ssm_llm_cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def source(tmp_path):
    directory = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(directory)
    return directory


@pytest.fixture
def conversions(monkeypatch):
    """Counts the conversions that really ran (cache misses)."""
    calls = []
    real = converters._convert

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(converters, "_convert", counting)
    return calls


def assert_same(a, b):
    (config_a, params_a), (config_b, params_b) = a, b
    assert config_a == config_b
    leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
    assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_miss_then_hit_gives_the_uncached_params(cache, source, conversions):
    uncached = converters.load(source)
    first = converters.load(source, cache=True)
    assert len(conversions) == 2 and len(model_cache.entries()) == 1
    second = converters.load(source, cache=True)
    assert len(conversions) == 2  # read from the entry
    assert_same(first, uncached)
    assert_same(second, uncached)
    [entry] = model_cache.entries()
    assert entry["source"] == str(source.resolve()) and entry["options"]["dtype"] == "float32"


def join_cache_writers():
    for thread in threading.enumerate():
        if thread.name == "ssm_llm cache write":
            thread.join()


def test_a_background_write_returns_the_params_at_once_and_stores_them(cache, source, conversions):
    first = converters.load(source, cache=True, cache_in_background=True)
    join_cache_writers()
    assert len(model_cache.entries()) == 1
    assert_same(converters.load(source, cache=True), first)
    assert len(conversions) == 1


def test_other_options_are_other_entries(cache, source, conversions):
    converters.load(source, cache=True)
    bf16 = converters.load(source, cache=True, dtype=jnp.bfloat16)
    quantized = converters.load(source, cache=True, quantize="w8a16")
    assert len(conversions) == 3 and len(model_cache.entries()) == 3
    assert_same(converters.load(source, cache=True, dtype=jnp.bfloat16), bf16)
    assert_same(converters.load(source, cache=True, quantize="w8a16"), quantized)
    assert_same(quantized, converters.load(source, quantize="w8a16"))  # QuantizedWeight leaves round-trip
    assert len(conversions) == 4  # only the last uncached load converted


def test_dotted_names_and_other_options_keep_their_own_entries(cache, tmp_path, conversions):
    """Entry names come from the source's name, dots and all (GGUF files, "Qwen2.5-0.5B"): each entry keeps
    its own description, so loads with other options or of a same-named model do not evict each other."""
    sources = [tmp_path / "a" / "Qwen2.5-0.5B", tmp_path / "b" / "Qwen2.5-0.5B"]
    for seed, source in enumerate(sources):  # other weights (same content would share an entry)
        tiny_hf_model("llama", seed=seed).save_pretrained(source)
    for _ in range(2):
        for source in sources:
            converters.load(source, cache=True)
            converters.load(source, cache=True, quantize="w8a16")
    assert len(conversions) == 4 and len(model_cache.entries()) == 4
    assert {e["source"] for e in model_cache.entries()} == {str(s.resolve()) for s in sources}


def test_a_new_converter_version_retires_the_entries(cache, source, conversions, monkeypatch):
    converters.load(source, cache=True)
    monkeypatch.setattr(model_cache, "code_digest", lambda: "another converter")
    converters.load(source, cache=True)
    assert len(conversions) == 2 and len(model_cache.entries()) == 1  # the old entry was replaced


def test_a_changed_source_is_converted_again_and_replaces_its_entry(cache, source, conversions):
    converters.load(source, cache=True)
    [old] = model_cache.entries()
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # same size on disk would not matter: the content digest changes
    (source / "config.json").write_text(json.dumps(config))
    changed = converters.load(source, cache=True)
    assert len(conversions) == 2 and changed[0].rms_norm_eps == 1e-3
    [new] = model_cache.entries()
    assert new["path"] != old["path"] and not old["path"].exists()


def test_a_damaged_entry_is_rebuilt_not_used(cache, source, conversions, capsys):
    want = converters.load(source, cache=True)
    [entry] = model_cache.entries()
    data = entry["path"] / model_cache.DATA
    blob = data.read_bytes()
    damages = {
        "a flipped byte": lambda: data.write_bytes(blob[:100] + bytes([blob[100] ^ 0x10]) + blob[101:]),
        "a truncated file": lambda: data.write_bytes(blob[: len(blob) // 2]),
        "a missing file": lambda: data.unlink(),
        "an edited manifest": lambda: (entry["path"] / model_cache.MANIFEST).write_text("{"),
    }
    for count, (name, damage) in enumerate(damages.items(), start=2):
        damage()
        got = converters.load(source, cache=True)
        assert len(conversions) == count and "is damaged" in capsys.readouterr().err, name
        assert_same(got, want)
        assert_same(converters.load(source, cache=True), want)  # the rebuilt entry is sound and used
        assert len(conversions) == count, name
        blob = data.read_bytes()


def test_an_unwritable_cache_costs_the_conversion_not_the_load(tmp_path, monkeypatch, source, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SSM_LLM_CACHE", str(blocker / "cache"))  # under a file: nothing can be created
    assert_same(converters.load(source, cache=True), converters.load(source))
    assert "could not write" in capsys.readouterr().err


def test_content_digests_are_remembered_by_stat(cache, source, monkeypatch):
    first = cache_dir.source_digest(source)
    hashed = []
    real = cache_dir._hash_file
    monkeypatch.setattr(cache_dir, "_hash_file", lambda path: hashed.append(path) or real(path))
    assert cache_dir.source_digest(source) == first and hashed == []
    (source / "config.json").write_text((source / "config.json").read_text() + " ")
    assert cache_dir.source_digest(source) != first and [p.name for p in hashed] == ["config.json"]


def test_the_console_script_exits_after_its_background_cache_write(cache, source):
    """`ssm-llm` leaves through `os._exit` (no interpreter teardown), after the background write of a new
    entry: the entry is complete once the process has ended."""
    import os
    import subprocess
    import sys

    save_word_level_tokenizer(source)
    argv = ["generate", "--model", str(source), "--prompt", "w3 w1 w4", "--max-new-tokens", "4"]
    env = {**os.environ, "SSM_LLM_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "ssm_llm_cli", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "tok/s]" in done.stderr  # the text and the speed line, flushed
    (entry,) = model_cache.entries()
    assert_same(model_cache.read_entry(entry["path"]), converters.load(source))


def test_cli_cache_ls_and_clear(cache, source, capsys):
    converters.load(source, cache=True)
    assert main(["cache", "ls"]) == 0
    out, err = capsys.readouterr()
    assert str(source.resolve()) in out and "1 cached model(s)" in err
    assert main(["cache", "clear"]) == 0
    assert "removed 1 cached model(s)" in capsys.readouterr().err and model_cache.entries() == []


def test_cli_speed_line_adds_up_and_the_second_run_reads_the_cache(cache, source, capsys, monkeypatch):
    """`generate --verbose`: the closing line gives load, compile, prefill and decode apart, and the
    breakdown's parts sum to its total; a second run reads the converted model from the cache."""
    import re

    save_word_level_tokenizer(source)
    argv = ["generate", "--model", str(source), "--prompt", "w3 w1 w4", "--max-new-tokens", "6", "--verbose"]
    calls = []
    real = converters._convert
    monkeypatch.setattr(converters, "_convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(2):
        assert main(argv) == 0
        join_cache_writers()  # the CLI stores a new entry in the background
        err = capsys.readouterr().err
        line = re.search(r"load ([\d.]+) s, compile ([\d.]+) s, prefill ([\d.]+) s, decode ([\d.]+) tok/s\]", err)
        assert line, err
        total, parts = re.search(r"\[([\d.]+) s = (.*)\]", err).groups()
        values = dict((k, float(v)) for k, v in re.findall(r"(\w+) (-?[\d.]+)", parts))
        assert set(values) == {"load", "tokenizer", "compile", "prefill", "decode", "other"}
        assert abs(sum(values.values()) - float(total)) <= 0.03  # each part rounded to 0.01 s
        assert all(v >= 0 for k, v in values.items() if k != "other") and abs(values["other"]) < 0.5
        assert float(line.group(1)) == values["load"] and float(line.group(2)) == values["compile"]
        assert len(calls) == 1  # converted on the first run only
    assert main(argv + ["--no-cache"]) == 0 and len(calls) == 2
