"""Sharded params and caches (`ssm_llm.sharding`): on 8 simulated CPU devices (a child process,
tests/sharding/sharded_run.py), tiny Llama (float and W8A8) / Qwen2 (GQA) / Mamba-1 / Mamba-2 (float and Quamba /
Quamba2 quantized) and a SmolLM2-shaped model
(9 / 3 heads: tp = 3) give one device's logits (1e-5) and greedy tokens, through `forward` with a sharded
cache and through `generate`; each device holds the shard the rules say. In this process: the rules'
specs and the clear errors, on abstract meshes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import ssm_llm
from ssm_llm.sharding import cache_specs, check_mesh, param_specs, plan

RUN = Path(__file__).with_name("sharded_run.py")
# The child processes compile without most XLA optimizations, as conftest.py does for this process: they run
# tiny models for a few steps, so compiling dominates (sharded_run.py: 281 s instead of 480 s on 2 cores, the
# same results: every equality holds, the largest logits difference 3.3e-6 both ways).
CHILD_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(scope="module")
def cases():
    done = subprocess.run([sys.executable, str(RUN)], capture_output=True, text=True, env=CHILD_ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    def key(c):
        if "model" in c or "sequence" in c:
            return c.get("model") or f"sequence {c['sequence']}", tuple(c["mesh"])
        return c.get("loading") or c.get("ring") or c["ssd"]

    return {key(c): c for c in found}


EXPECTED_CASES = [
    ("llama", (1, 8)),
    ("llama", (2, 4)),
    ("qwen2-gqa", (4, 2)),
    ("smollm2-shaped", (2, 3)),
    ("llama-w8a8", (2, 4)),
    ("mamba1", (2, 4)),
    ("mamba2", (4, 2)),
    ("mamba2-quamba2", (2, 4)),
    ("mamba1-quamba", (2, 4)),
]


@pytest.mark.parametrize("case", EXPECTED_CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def test_sharded_model_equals_one_device(cases, case):
    c = cases[case]
    assert c["devices"] == case[1][0] * case[1][1]
    assert c["logits_diff"] <= 1e-5
    assert c["tokens_equal"] and c["generate_equal"]
    assert all(c["options_equal"].values()), c["options_equal"]  # KV policies, speculative decoding
    if case[0] == "qwen2-gqa":
        assert set(c["options_equal"]) == {"snapkv", "kivi", "prompt lookup"}
    if c["planned"] is not None:  # the planner sizes float models (and their caches)
        if not case[0].endswith("-w8a8"):
            assert c["planned"]["weights"] == c["held_weights"]
        assert c["planned"]["cache"] == c["held_cache"]


# The first device's shard of some leaves, by hand from the Megatron layout (layers stacked first).
SHARDS = {
    ("llama", (2, 4)): {
        "['layers']['wq']": [2, 64, 16],  # 8 heads x 8 -> 2 heads per device
        "['layers']['wo']": [2, 16, 64],
        "['layers']['w_down']": [2, 32, 64],
        "['layers']['attn_norm']": [2, 64],
        "['embed']": [32, 64],
        "['lm_head']": [64, 32],
    },
    ("smollm2-shaped", (2, 3)): {
        "['layers']['wq']": [2, 576, 192],  # 3 of 9 query heads
        "['layers']['wk']": [2, 576, 64],  # 1 of 3 kv heads
        "['layers']['w_gate']": [2, 576, 512],
        "['embed']": [16384, 576],
    },
    ("qwen2-gqa", (4, 2)): {"['layers']['bk']": [2, 16], "['layers']['bq']": [2, 32]},
    ("mamba1", (2, 4)): {
        "['layers']['in_proj']": [2, 16, 256],  # fused [x | z]: split by its input rows
        "['layers']['conv_w']": [2, 32, 4],
        "['layers']['A_log']": [2, 32, 16],
        "['layers']['dt_proj']": [2, 8, 32],
        "['layers']['out_proj']": [2, 32, 64],
    },
    ("mamba2", (4, 2)): {
        "['layers']['in_proj']": [2, 32, 328],
        "['layers']['A_log']": [2, 4],
        "['layers']['gated_norm']": [2, 64],
        "['layers']['out_proj']": [2, 64, 64],
    },
    ("mamba2-quamba2", (2, 4)): {  # int8 codes split like the float weights; activation scales whole
        "['layers']['in_proj'].values": [2, 16, 328],
        "['layers']['out_proj'].values": [2, 32, 64],
        "['layers']['out_proj'].scales": [2, 1, 64],
        "['layers']['scales']['x']": [2, 128],
    },
    ("mamba1-quamba", (2, 4)): {  # 4-bit codes, two rows per byte; group scales split with their rows
        "['layers']['out_proj'].values": [2, 16, 64],
        "['layers']['out_proj'].scales": [2, 2, 64],
    },
}
CACHE_SHARDS = {
    ("llama", (2, 4)): {".k": [2, 4, 2, 32, 8], ".lengths": [4]},  # [L, B, H_kv, S, D]
    ("smollm2-shaped", (2, 3)): {".v": [2, 4, 1, 32, 64]},
    ("mamba1", (2, 4)): {".ssm_state": [2, 4, 32, 16], ".conv_state": [2, 4, 32, 3]},
    ("mamba2", (4, 2)): {".ssm_state": [2, 2, 4, 16, 16], ".conv_state": [2, 2, 192, 3]},
    ("mamba2-quamba2", (2, 4)): {".ssm_state": [2, 4, 2, 16, 16]},  # int8 state codes
}


@pytest.mark.parametrize("case", list(SHARDS), ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def test_each_device_holds_the_shard_the_rules_say(cases, case):
    c = cases[case]
    for path, shape in SHARDS[case].items():
        assert c["param_shards"][path] == shape, path
    for path, shape in CACHE_SHARDS.get(case, {}).items():
        assert c["cache_shards"][path] == shape, path


@pytest.mark.parametrize("how", ["load", "restore"])
def test_load_onto_the_mesh_and_restore_sharded(cases, how):
    """converters.load(hf_dir, mesh=) and the orbax checkpoint saved from those sharded params, read back
    with mesh=: the values of a plain load, each leaf with the rules' sharding."""
    c = cases[how]
    assert c["equal"]
    assert c["param_specs"]["['layers']['wq']"] == "P(None, None, 'model')"
    assert c["param_specs"]["['layers']['w_down']"] == "P(None, 'model', None)"
    assert c["param_specs"]["['embed']"] == "P('model', None)"


def test_restore_a_quantized_checkpoint_into_its_shards(cases):
    """A W8A8 checkpoint saved from sharded params and read back with mesh=: restored leaf by leaf into the
    rules' shards (the child disables converters.shard_params while restoring), codes and scales equal."""
    c = cases["restore w8a8"]
    assert c["equal"]
    assert c["param_specs"]["['layers']['wq'].values"] == "P(None, None, 'model')"
    assert c["param_specs"]["['layers']['wo'].values"] == "P(None, 'model', None)"
    assert c["param_specs"]["['layers']['wq'].scales"] == "P(None, None, 'model')"


@pytest.mark.parametrize("name", ["contiguous 8", "zigzag 8", "zigzag 4 x heads 2"])
def test_ring_attention_equals_full_causal_attention(cases, name):
    """RingAttention over 8 devices (contiguous and zigzag order; 4 sequence x 2 head devices), GQA,
    ragged lengths: within 1e-5 of causal softmax attention computed in float64 numpy."""
    assert cases[name]["diff"] <= 1e-5


def test_sequence_parallel_ssd_equals_the_single_device_scan(cases):
    """Mamba-2's chunked SSD with the sequence over 8 devices (states passed across them) against the same
    scan on one device, from a nonzero initial state: outputs and final state within 1e-6 relative."""
    c = cases["8 devices"]
    assert c["y_rel"] <= 1e-6 and c["state_rel"] <= 1e-6


@pytest.mark.parametrize("model", ["llama-window", "mamba2"])
@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_sequence_parallel_prefill_equals_one_device(cases, model, mesh):
    """`forward(..., sequence_parallel=SequenceParallel(mesh))` on a ("data", "seq", "model") mesh — a ragged
    29-token prefill (padded inside to the ring's blocks) of a GQA model with a sliding-window layer
    (RingAttention) and of Mamba-2 (sequence-parallel SSD), composed with data and tensor parallelism —
    gives one device's logits (1e-5 on the real rows) and greedy tokens; so does `generate(...,
    sequence_parallel=sp)`; Mamba-2 also continues a second prefill chunk from the state the first left."""
    c = cases[(f"sequence {model}", mesh)]
    assert c["logits_diff"] <= 1e-5
    assert c["tokens_equal"] and c["generate_equal"]
    if model == "mamba2":
        assert c["chunked_diff"] <= 1e-5


def test_sequence_parallel_refuses_what_it_cannot_split():
    from ssm_llm.sharding import SequenceParallel

    mesh = jax.make_mesh((1, 1), ("data", "seq"))
    with pytest.raises(ValueError, match="mesh has no axis 'ring'"):
        SequenceParallel(mesh, axis="ring")
    with pytest.raises(ValueError, match="already holds the batch"):
        SequenceParallel(mesh, axis="data")
    sp = SequenceParallel(mesh)
    tokens = np.ones((1, 4), np.int32)
    mamba1 = ssm_llm.MambaConfig(vocab_size=16, hidden_size=8, num_layers=1, state_size=4, intermediate_size=16)
    with pytest.raises(ValueError, match="not MambaConfig"):
        ssm_llm.forward(
            ssm_llm.init_params(mamba1, jax.random.key(0)),
            mamba1,
            tokens,
            ssm_llm.init_cache(mamba1, 1, 8),
            sequence_parallel=sp,
        )
    llama = ssm_llm.ModelConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4
    )
    params = ssm_llm.init_params(llama, jax.random.key(0))
    _, cache = ssm_llm.forward(params, llama, tokens, ssm_llm.init_cache(llama, 1, 16))
    with pytest.raises(ValueError, match="fresh prefill: pass an empty dense cache"):
        ssm_llm.forward(params, llama, tokens, cache, sequence_parallel=sp)
    with pytest.raises(TypeError, match="must be an ssm_llm.sharding.SequenceParallel"):
        ssm_llm.forward(params, llama, tokens, ssm_llm.init_cache(llama, 1, 16), sequence_parallel=mesh)
    with pytest.raises(ValueError, match="does not combine with kv_compression"):
        ssm_llm.generate(
            params,
            llama,
            [[1, 2, 3]],
            ssm_llm.GenerationConfig(max_new_tokens=2, kv_compression=ssm_llm.kv.StreamingLLM(budget=4, sinks=1)),
            sequence_parallel=sp,
        )


def test_ring_attention_refuses_what_does_not_split():
    from jax.sharding import AbstractMesh

    from ssm_llm.sharding import ring_attention, zigzag_order

    x = np.zeros((1, 12, 2, 4), np.float32)
    with pytest.raises(ValueError, match="16 equal chunks; 12 does not"):
        zigzag_order(12, 8)
    with pytest.raises(ValueError, match="mesh has no axis 'seq'"):
        ring_attention(x, x, x, AbstractMesh((1,), ("model",)))
    with pytest.raises(ValueError, match="head_axis .model. of size 4 does not divide the 2 kv heads"):
        ring_attention(x, x, x, AbstractMesh((2, 4), ("seq", "model")), head_axis="model")


SMOLLM2_SHAPED = ssm_llm.ModelConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64
)


def abstract(dp, tp):
    return AbstractMesh((dp, tp), ("data", "model"))


def test_specs_follow_the_table():
    config = ssm_llm.ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    params = jax.eval_shape(lambda: ssm_llm.init_params(config, jax.random.key(0)))
    specs = param_specs(params, config, abstract(1, 2))
    assert specs["layers"]["wq"] == PartitionSpec(None, None, "model")
    assert specs["layers"]["wo"] == PartitionSpec(None, "model", None)
    assert specs["embed"] == PartitionSpec("model", None) and specs["lm_head"] == PartitionSpec(None, "model")
    unstacked = param_specs(
        ssm_llm.unstack_layers(ssm_llm.init_params(config, jax.random.key(0))), config, abstract(1, 2)
    )
    assert unstacked["layers"][1]["w_down"] == PartitionSpec("model", None)
    cache = jax.eval_shape(lambda: ssm_llm.init_cache(config, 4, 16))
    assert cache_specs(cache, config, abstract(2, 2)).k == PartitionSpec(None, "data", "model", None, None)


def test_w8a8_weights_shard_like_their_float_weights():
    config = ssm_llm.ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    params, qconfig = ssm_llm.quantize_weights(ssm_llm.init_params(config, jax.random.key(0)), config, "w8a8")
    specs = param_specs(params, qconfig, abstract(1, 2))
    assert specs["layers"]["wq"].values == PartitionSpec(None, None, "model")
    assert specs["layers"]["wq"].scales == PartitionSpec(None, None, "model")  # one scale per output column
    assert specs["layers"]["wo"].values == PartitionSpec(None, "model", None)
    assert specs["layers"]["wo"].scales == PartitionSpec(None, None, None)  # [L, 1, N]: the 1 stays whole


def test_clear_errors():
    with pytest.raises(ValueError, match=r"does not divide heads \(9\).*sizes \[1, 3\]"):
        check_mesh(SMOLLM2_SHAPED, abstract(1, 2))
    check_mesh(SMOLLM2_SHAPED, abstract(2, 3))
    with pytest.raises(ValueError, match=r"'data' of size 2 does not divide batch \(3\)"):
        check_mesh(SMOLLM2_SHAPED, abstract(2, 3), batch=3)
    params = jax.eval_shape(lambda: ssm_llm.init_params(SMOLLM2_SHAPED, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"params\['extra'\]: no sharding rule"):
        param_specs({**params, "extra": params["final_norm"]}, SMOLLM2_SHAPED, abstract(1, 3))
    with pytest.raises(TypeError, match="sharding supports"):
        check_mesh({"vocab_size": 8}, abstract(1, 1))


def test_plan_scales_weights_with_tp():
    config = SMOLLM2_SHAPED
    one, three = plan(config, abstract(1, 1), 4, 256), plan(config, abstract(1, 3), 4, 256)
    params = jax.eval_shape(lambda: ssm_llm.init_params(config, jax.random.key(0)))
    assert one.weights == sum(x.size * 4 for x in jax.tree.leaves(params))
    norms = sum(x.size * 4 for k, x in params["layers"].items() if "norm" in k) + params["final_norm"].size * 4
    assert three.weights == (one.weights - norms) // 3 + norms  # everything but the norms split three ways
    lengths = 4 * 4  # [B] int32, whole on every device of the model axis
    assert three.cache == (one.cache - lengths) // 3 + lengths and "per device on data=1 x model=3" in str(three)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], env: dict, timeout: int = 300) -> list[tuple[str, str]]:
    """Start the processes of one multi-process run together, wait for all (each bounded by `timeout`),
    kill any left over, and return their (stdout, stderr); every one must have succeeded."""
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for command in commands
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


def test_two_processes_give_the_single_process_output():
    """Two local processes x 4 CPU devices, joined by jax.distributed on 127.0.0.1 (gloo collectives), run
    a tiny Llama and Mamba-2 sharded over a (2, 4) mesh of all 8 devices: the greedy tokens of one process
    on one device, exactly (gloo has been reported to return wrong data intermittently: equality guards
    it), logits within 1e-5. Each process is bounded in time."""
    script = str(Path(__file__).with_name("multiprocess_run.py"))
    env = CHILD_ENV
    single = subprocess.run([sys.executable, script, "single"], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = free_port()
    outputs = run_processes([[sys.executable, script, str(i), "2", str(port)] for i in range(2)], env)

    def results(stdout):  # gloo writes its own lines to stdout too
        return {d["model"]: d for d in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))}

    assert not results(outputs[1][0])  # only process 0 prints
    ref, got = results(single.stdout), results(outputs[0][0])
    assert set(got) == {"llama", "mamba2"}
    for name, d in got.items():
        assert (d["processes"], d["devices"]) == (2, 8)
        assert d["tokens"] == ref[name]["tokens"], name
        diff = float(np.abs(np.array(d["logits"]) - np.array(ref[name]["logits"])).max())
        assert diff <= 1e-5, (name, diff)


def test_initialize_refuses_bad_arguments():
    from ssm_llm.sharding import initialize

    with pytest.raises(ValueError, match="HOST:PORT"):
        initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="process_id must be an int in \\[0, 2\\)"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes must be a positive int"):
        initialize("127.0.0.1:1234", 0, 0)


# Gloo's connection messages on stdout; two threads of one process may interleave them mid-line, e.g.
# "[Gloo] Rank [Gloo] Rank 2 is connected to ...\n3 is connected to ...", so they are removed by pieces.
GLOO_PIECES = re.compile(
    r"\[Gloo\] Rank |\d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+"
)


def printed_lines(stdout: str) -> list[str]:
    """A process's stdout lines without Gloo's connection messages (lines left empty by them dropped)."""
    return [line for line in GLOO_PIECES.sub("", stdout).splitlines() if line.strip()]


def test_cli_generates_the_same_text_over_two_processes(tmp_path):
    """`ssm-llm generate --mesh 1x4 --coordinator ...` in two processes of 2 CPU devices each prints, from
    process 0 only, the text of a plain single-device run."""
    from conftest import save_word_level_tokenizer, tiny_hf_model

    model = tmp_path / "model"
    tiny_hf_model(
        "llama", vocab_size=128, num_attention_heads=8, num_key_value_heads=4, hidden_size=64
    ).save_pretrained(model)
    save_word_level_tokenizer(model)
    argv = [sys.executable, "-m", "ssm_llm_cli", "generate", "--model", str(model), "--prompt", "w3 w1 w4 w9"]
    argv += ["--max-new-tokens", "8", "--no-cache"]
    env = {**CHILD_ENV, "SSM_LLM_CACHE": str(tmp_path / "cache")}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    port = free_port()
    multi_env = {**env, "XLA_FLAGS": env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    joined = ["--mesh", "1x4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    outputs = run_processes([argv + joined + [str(i)] for i in range(2)], multi_env)
    text = printed_lines(outputs[0][0])
    assert text and text == [line for line in plain.stdout.splitlines()]
    assert printed_lines(outputs[1][0]) == []  # process 1 prints no text
    assert "tok/s]" in outputs[0][1] and "tok/s]" not in outputs[1][1]
