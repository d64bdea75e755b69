"""Bad inputs to the core API (forward, generate, configs, caches): each gives a clear error that names the
offending value, or a documented, visible result (NaN logits under jit) instead of a silent wrong answer."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import ssm_llm
from ssm_llm import GenerationConfig
from ssm_llm.generation import MAX_NEW_TOKENS

CONFIG = ssm_llm.ModelConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=128,
    eos_token_ids=(3,),
)
MAMBA = ssm_llm.MambaConfig(vocab_size=64, hidden_size=16, num_layers=2, state_size=4, intermediate_size=32)


@pytest.fixture(scope="module")
def params():
    return ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def mamba_params():
    return ssm_llm.init_params(MAMBA, jax.random.PRNGKey(1))


def _jitted_forward(**kwargs):
    return jax.jit(lambda p, t, c: ssm_llm.forward(p, CONFIG, t, c, **kwargs))


# --- forward under jax.jit: the Python checks cannot see traced values -------------------------------------


def test_jitted_overflow_gives_nan_logits_not_wrong_ones(params):
    step = _jitted_forward()
    full = ssm_llm.init_cache(CONFIG, 2, 4)
    logits, full = step(params, jnp.asarray([[1, 2, 3, 4], [1, 2, 3, 4]]), full)
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = step(params, jnp.asarray([[5], [6]]), full)  # a 5th token into a 4-slot cache
    assert np.isnan(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="cache overflow: sequence 0 would hold 5 tokens but the cache max_len is 4"):
        ssm_llm.forward(params, CONFIG, jnp.asarray([[5], [6]]), full)  # eager: a clear error


def test_jitted_bad_token_id_poisons_only_its_row(params):
    cache = ssm_llm.init_cache(CONFIG, 2, 8)
    logits, _ = _jitted_forward()(params, jnp.asarray([[1, 2], [1, 64]]), cache)
    logits = np.asarray(logits)
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()
    with pytest.raises(ValueError, match=r"token id 64 is outside the vocabulary \[0, 64\)"):
        ssm_llm.forward(params, CONFIG, jnp.asarray([[1, 2], [1, 64]]), cache)


def test_jitted_padding_past_token_counts_is_not_checked(params):
    """Only each row's real tokens count: right padding may hold anything."""
    step = jax.jit(lambda p, t, c, n: ssm_llm.forward(p, CONFIG, t, c, token_counts=n))
    logits, _ = step(params, jnp.asarray([[1, 2], [1, -1]]), ssm_llm.init_cache(CONFIG, 2, 8), jnp.asarray([2, 1]))
    assert np.isfinite(np.asarray(logits)).all()


def test_checkify_errors_raise_under_jit(params):
    step = jax.jit(checkify.checkify(lambda p, t, c: ssm_llm.forward(p, CONFIG, t, c, checkify_errors=True)))
    cache = ssm_llm.init_cache(CONFIG, 1, 4)
    err, (_, cache) = step(params, jnp.asarray([[1, 2, 3, 4]]), cache)
    err.throw()  # no error
    err, _ = step(params, jnp.asarray([[5]]), cache)
    with pytest.raises(checkify.JaxRuntimeError, match="cache overflow in row 0"):
        err.throw()
    err, _ = step(params, jnp.asarray([[70, 1, 2, 3]]), ssm_llm.init_cache(CONFIG, 1, 4))
    with pytest.raises(checkify.JaxRuntimeError, match=r"outside the vocabulary \[0, 64\)"):
        err.throw()


def test_mamba_jitted_bad_id_is_nan(mamba_params):
    step = jax.jit(lambda p, t, c: ssm_llm.forward(p, MAMBA, t, c))
    logits, _ = step(mamba_params, jnp.asarray([[1, -3]]), ssm_llm.init_cache(MAMBA, 1, 1))
    assert np.isnan(np.asarray(logits)).all()


# --- params checked against the config ---------------------------------------------------------------------


def test_params_that_do_not_match_the_config(params, mamba_params):
    short = {**params, "embed": params["embed"][:50]}
    needs = r"params\['embed'\] has shape \(50, 16\), but the ModelConfig needs \(64, 16\)"
    with pytest.raises(ValueError, match=needs):
        ssm_llm.forward(short, CONFIG, jnp.asarray([[1]]), ssm_llm.init_cache(CONFIG, 1, 4))
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(50, 16\)"):
        ssm_llm.generate(short, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"params does not match the ModelConfig: missing \['lm_head'\]"):
        ssm_llm.generate(mamba_params, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=2))
    more_heads = dataclasses.replace(CONFIG, num_kv_heads=2)
    with pytest.raises(
        ValueError,
        match=r"params\['layers'\]\['wk'\] has shape \(2, 16, 8\), but the ModelConfig "
        r"needs \(2, 16, 16\)",
    ):
        ssm_llm.generate(params, more_heads, [[1, 2]], GenerationConfig(max_new_tokens=2))
    unstacked = ssm_llm.unstack_layers(params)
    with pytest.raises(ValueError, match=r"params\['layers'\] holds 1 layers but the ModelConfig has num_layers=2"):
        ssm_llm.generate({**unstacked, "layers": unstacked["layers"][:1]}, CONFIG, [[1]])
    ints = {**params, "final_norm": params["final_norm"].astype(jnp.int32)}
    with pytest.raises(ValueError, match=r"params\['final_norm'\] has dtype int32; expected a floating dtype"):
        ssm_llm.generate(ints, CONFIG, [[1]])


def test_checkpoint_with_an_edited_config_is_refused(params, tmp_path):
    import converters

    converters.save(params, CONFIG, tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "ssm_llm_config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["hidden_size"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        ValueError,
        match=r"params do not match ssm_llm_config.json: params\['embed'\] has shape "
        r"\(64, 16\), but the ModelConfig needs \(64, 32\)",
    ):
        converters.load(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda meta: meta.update(config=[meta["config"]]),
            "a saved model config must be a JSON object .dict., got list",
        ),
        (lambda meta: meta["config"].update(rope=[1]), "saved config 'rope' must be a JSON object, got \\[1\\]"),
        (
            lambda meta: meta["config"].update(rope={"theta": 1e4, "spin": 1}),
            r"unknown keys in saved rope config: \['spin'\]",
        ),
        (lambda meta: meta["config"].update(eos_token_ids=2), "saved config 'eos_token_ids' must be a list, got 2"),
        (lambda meta: meta["config"].update(model_type={"a": 1}), r"config.model_type must be a non-empty string"),
        (
            lambda meta: meta["config"].pop("vocab_size"),
            r"saved attention model config lacks required keys \['vocab_size'\]",
        ),
    ],
)
def test_checkpoint_with_a_malformed_config_is_refused(params, tmp_path, edit, message):
    import converters

    converters.save(params, CONFIG, tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "ssm_llm_config.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ckpt/ssm_llm_config.json: corrupt ssm_llm config \(" + message):
        converters.load(tmp_path / "ckpt")


def test_damaged_checkpoint_bytes_are_detected(params, tmp_path):
    """orbax keeps no checksum: a flipped byte in params/ must not load as a silently different weight."""
    import converters

    ckpt = converters.save(params, CONFIG, tmp_path / "ckpt")
    meta_path = ckpt / "ssm_llm_config.json"
    original = meta_path.read_text()
    assert converters.load(ckpt)[0] == CONFIG  # the recorded digests match what was saved
    meta = json.loads(original)
    meta["sha256"]["['final_norm']"] = "0" * 64  # as if the stored bytes had changed since
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        ValueError,
        match=r"1 param\(s\) differ from what was saved \(checksum mismatch in "
        r"\['final_norm'\]\); the checkpoint is damaged",
    ):
        converters.load(ckpt)
    meta_path.write_text(original)
    # A flipped byte in the stored arrays is refused (by the checksum or by orbax itself) or, if it lies in
    # bytes orbax never reads back, loads the very params that were saved: never different ones.
    data = max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob = data.read_bytes()
    refused = 0
    for pos in range(len(blob) // 4, len(blob), len(blob) // 8):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x10
        data.write_bytes(bytes(damaged))
        try:
            _, loaded = converters.load(ckpt)
        except ValueError as e:
            assert re.search(r"ckpt: (cannot restore params|.* differ from what was saved)", str(e)), e
            refused += 1
        else:
            for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert refused >= 3


# --- configs and generation options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eos_token_ids="2"), "eos_token_ids must be token ids \\(ints\\), got the string '2'"),
        (dict(eos_token_ids=[2, -1]), r"eos_token_ids\[1\] must be an int >= 0, got -1"),
        (dict(eos_token_ids=[2.0]), r"eos_token_ids\[0\] must be an int, got 2.0"),
        (dict(max_new_tokens=True), "max_new_tokens must be an int, got True"),
        (dict(max_new_tokens=MAX_NEW_TOKENS + 1), rf"max_new_tokens must be an int in \[1, {MAX_NEW_TOKENS}\]"),
        (dict(seed=2**70), r"seed must be an int in \[0, 4294967295\], got 1180591620717411303424"),
        (dict(seed=2**32), r"seed must be an int in \[0, 4294967295\]"),  # would draw what seed 0 draws
        (dict(seed=-1), r"seed must be an int in \[0, 4294967295\], got -1"),
        (dict(seed="abc"), "seed must be an int, got 'abc'"),
        (dict(temperature=float("inf")), r"temperature must be a finite number in \[0.0, inf\), got inf"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(top_p="0.9"), "top_p must be a number, got '0.9'"),
        (dict(top_k=2.5), "top_k must be an int, got 2.5"),
        (dict(max_len=1.0), "max_len must be an int, got 1.0"),
    ],
)
def test_bad_generation_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_numpy_integers_are_ints():
    g = GenerationConfig(max_new_tokens=np.int64(5), seed=np.uint32(7), top_k=np.int32(3), eos_token_ids=np.int64(2))
    assert (g.max_new_tokens, g.seed, g.top_k, g.eos_token_ids) == (5, 7, 3, (2,))
    assert type(g.max_new_tokens) is int
    config = ssm_llm.ModelConfig(
        vocab_size=np.int64(64),
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=np.int32(8),
    )
    assert config == ssm_llm.ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8
    )
    assert ssm_llm.init_cache(config, np.int64(2), np.int64(8)).k.shape == (2, 2, 1, 8, 8)


def test_config_token_ids_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match=r"config.eos_token_ids\[0\] must be an int in \[0, 63\], got 64"):
        dataclasses.replace(CONFIG, eos_token_ids=(64,))
    with pytest.raises(ValueError, match=r"config.bos_token_id must be an int in \[0, 63\], got -1"):
        dataclasses.replace(MAMBA, bos_token_id=-1)
    with pytest.raises(ValueError, match="config.rms_norm_eps must be a number, got 'abc'"):
        dataclasses.replace(CONFIG, rms_norm_eps="abc")


def test_generate_refuses_eos_outside_the_vocabulary(params):
    with pytest.raises(ValueError, match=r"eos_token_ids\[0\] must be an int in \[0, 63\], got 64"):
        ssm_llm.generate(params, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=2, eos_token_ids=[64]))


def test_wrong_argument_types_name_what_is_expected(params):
    with pytest.raises(TypeError, match="not a model config: dict .*ssm_llm.config_from_dict"):
        ssm_llm.generate(params, CONFIG.to_dict(), [[1, 2]])
    with pytest.raises(TypeError, match="gen_config must be a GenerationConfig, got dict"):
        ssm_llm.generate(params, CONFIG, [[1, 2]], {"max_new_tokens": 2})
    with pytest.raises(TypeError, match="on_token must be callable"):
        ssm_llm.generate(params, CONFIG, [[1, 2]], on_token="print")
    with pytest.raises(TypeError, match="not a model config: dict"):
        ssm_llm.forward(params, {"vocab_size": 64}, jnp.asarray([[1]]), ssm_llm.init_cache(CONFIG, 1, 4))


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[1, [2, 3]]], r"prompt 0 must be a flat list of int token ids, got \[1, \[2, 3\]\]"),
        ([[1, 2], "hello"], r"prompt 1 is text \('hello'\); pass token ids"),
        ("hello", "prompts must be a non-empty list of token-id lists"),
        ([[1.5, 2]], "prompt 0 must be a flat list of int token ids"),
        ([[True, False]], "prompt 0 must be a flat list of int token ids"),
        ([[1, 99]], r"prompt 0 holds token id 99, outside the vocabulary \[0, 64\)"),
    ],
)
def test_bad_prompts(params, prompts, message):
    with pytest.raises(ValueError, match=message):
        ssm_llm.generate(params, CONFIG, prompts, GenerationConfig(max_new_tokens=2))


def test_forward_token_inputs(params):
    cache = ssm_llm.init_cache(CONFIG, 1, 8)
    with pytest.raises(ValueError, match="tokens must be a \\[batch, steps\\] array of int token ids"):
        ssm_llm.forward(params, CONFIG, [[1, [2]]], cache)
    for strange in ([["1", "2"]], [[1.0, 2.0]], [[True, False]]):
        with pytest.raises(ValueError, match="tokens must be a \\[batch, steps\\] array of int token ids, got dtype"):
            ssm_llm.forward(params, CONFIG, np.asarray(strange), cache)
    with pytest.raises(ValueError, match="token_counts must be \\[batch\\] ints"):
        ssm_llm.forward(params, CONFIG, [[1, 2]], cache, token_counts=[1.5])
    listed, _ = ssm_llm.forward(params, CONFIG, [[1, 2]], cache, token_counts=[np.int64(1)])  # lists are fine
    array, _ = ssm_llm.forward(params, CONFIG, jnp.asarray([[1, 2]]), cache, token_counts=jnp.asarray([1]))
    np.testing.assert_array_equal(np.asarray(listed), np.asarray(array))


def test_top_k_past_the_vocabulary_keeps_every_token(params):
    """top_k >= vocab filters nothing: the same draws as top_k off."""
    opts = dict(max_new_tokens=4, temperature=1.0, seed=3, eos_token_ids=())
    wide = ssm_llm.generate(params, CONFIG, [[1, 2]], GenerationConfig(top_k=10**6, **opts))
    off = ssm_llm.generate(params, CONFIG, [[1, 2]], GenerationConfig(**opts))
    assert wide.tokens == off.tokens


# --- streaming callbacks ----------------------------------------------------------------------------------------


def test_a_raising_on_token_callback_is_reraised(params):
    seen = []

    def callback(step, tokens):
        seen.append(int(step))
        if step == 1:
            raise KeyError("bug in the user's callback")

    with pytest.raises(KeyError, match="bug in the user's callback"):
        ssm_llm.generate(
            params, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=6, eos_token_ids=()), on_token=callback
        )
    assert seen == [0, 1]  # nothing delivered after the error
    # The next call with another callback streams normally, through the same compiled loop.
    got = []
    out = ssm_llm.generate(
        params,
        CONFIG,
        [[1, 2]],
        GenerationConfig(max_new_tokens=6, eos_token_ids=()),
        on_token=lambda step, tokens: got.append(int(tokens[0])),
    )
    assert got == out.tokens[0]


# --- bounded sizes and memory ---------------------------------------------------------------------------------


def test_state_space_models_have_a_stated_ceiling_on_new_tokens(mamba_params):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be an int in \[1, {MAX_NEW_TOKENS}\], got 1000000000"):
        ssm_llm.generate(mamba_params, MAMBA, [[1, 2]], GenerationConfig(max_new_tokens=10**9))


def test_memory_is_estimated_before_allocating(params, mamba_params, monkeypatch):
    from ssm_llm import kv, memory

    with pytest.raises(ValueError, match=r"StreamingLLM: budget \(1000000000\) exceeds the model's context of 128"):
        ssm_llm.generate(
            params, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=4, kv_compression=kv.StreamingLLM(budget=10**9))
        )
    monkeypatch.setattr(memory, "_host_available", lambda: 2**30)  # pretend 1 GiB is free
    with pytest.raises(
        MemoryError,
        match=r"max_new_tokens=1048576 \(the output buffer\) would need 1.6 GiB, "
        r"more than the 1.0 GiB free",
    ):
        ssm_llm.generate(mamba_params, MAMBA, [[1, 2]] * 400, GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    with pytest.raises(MemoryError, match=r"a KV cache of batch=1000, max_len=1000000 would need 119.2 GiB"):
        ssm_llm.init_cache(CONFIG, 1000, 10**6)
    monkeypatch.setattr(memory, "_host_available", lambda: 2**10)  # 1 KiB
    policy = kv.StreamingLLM(budget=100)
    with pytest.raises(MemoryError, match=r"kv_compression=StreamingLLM\(budget=100, .*would need 14.5 KiB"):
        ssm_llm.generate(params, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=4, kv_compression=policy))
    with pytest.raises(MemoryError, match=r"kv_compression=StreamingLLM\(budget=100, .*with max_len=64 would need"):
        kv.prefill(params, CONFIG, [[1, 2]], policy, max_len=64)
    with pytest.raises(MemoryError, match=r"a KV cache of 64 positions for 1 prompts .*would need 8.0 KiB"):
        ssm_llm.generate(params, CONFIG, [[1, 2]], GenerationConfig(max_new_tokens=4))
