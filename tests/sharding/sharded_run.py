"""Run by tests/sharding/test_sharding.py in a child process with 8 simulated CPU devices (XLA_FLAGS must be
set before JAX starts): each model sharded on several meshes against the same model on one device. Prints
one JSON line per case."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

import ssm_llm  # noqa: E402
from ssm_llm.sharding import plan, shard_batch  # noqa: E402

MODELS = {
    "llama": ssm_llm.ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8
    ),
    "qwen2-gqa": ssm_llm.ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        qkv_bias=True,
        model_type="qwen2",
    ),
    "smollm2-shaped": ssm_llm.ModelConfig(  # SmolLM2-135M's heads (9 / 3), widths and vocabulary, 2 layers
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=2,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-w8a8": ssm_llm.ModelConfig(  # quantized below: int8 weights and activations
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8
    ),
    "mamba1": ssm_llm.MambaConfig(
        vocab_size=128, hidden_size=64, num_layers=2, state_size=16, intermediate_size=128, time_step_rank=8
    ),
    "mamba2": ssm_llm.Mamba2Config(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        state_size=16,
        intermediate_size=128,
        num_heads=8,
        head_dim=16,
        n_groups=2,
        chunk_size=8,
    ),
}
MODELS["mamba2-quamba2"] = MODELS["mamba2"]  # quantized below: Quamba2 W8A8 (int8 weights, activations, states)
MODELS["mamba1-quamba"] = MODELS["mamba1"]  # Quamba W4A8 (4-bit group-wise weights)
# One data x model mesh per model (the shapes test_sharding.py checks by hand), and for Llama pure tensor
# parallelism over all 8 devices too. (Pure data parallelism, 1 x 8 for the Mamba models and 1 x 3 for the
# SmolLM2-shape also passed; they were dropped to keep CI within its time: a mesh case costs 2-13 s on 2 cores.)
MESHES = {
    "llama": [(1, 8), (2, 4)],
    "qwen2-gqa": [(4, 2)],
    "smollm2-shaped": [(2, 3)],
    "llama-w8a8": [(2, 4)],
    "mamba1": [(2, 4)],
    "mamba2": [(4, 2)],
    "mamba2-quamba2": [(2, 4)],
    "mamba1-quamba": [(2, 4)],
}
BATCH, PROMPT, STEPS = 8, 10, 6
OPTIONS = {  # generation options that run on sharded params unchanged (checked on one model)
    "snapkv": ssm_llm.GenerationConfig(max_new_tokens=STEPS, kv_compression=ssm_llm.kv.SnapKV(budget=6, window=4)),
    "kivi": ssm_llm.GenerationConfig(max_new_tokens=STEPS, kv_compression=ssm_llm.kv.KIVI()),
    "prompt lookup": ssm_llm.GenerationConfig(max_new_tokens=STEPS, speculative=ssm_llm.speculative.PromptLookup()),
}


def mesh_of(shape):
    devices = np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    return Mesh(devices, ("data", "model"))


def greedy(params, config, tokens, cache):
    """Prefill logits, then STEPS greedy tokens through forward with the cache."""
    step = jax.jit(lambda p, t, c: ssm_llm.forward(p, config, t, c))
    logits, cache = step(params, tokens, cache)
    out, first = [], logits
    for _ in range(STEPS):
        nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        out.append(np.asarray(nxt)[:, 0])
        logits, cache = step(params, nxt, cache)
    return np.asarray(first), np.stack(out, 1)


def shard_shapes(tree):
    """{path: shape of the first device's shard} of every leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape) for p, x in leaves}


def held(tree) -> int:
    """Bytes of the first device's shards of every leaf."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def specs(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): str(PartitionSpec(*x.sharding.spec)) for p, x in leaves}


def main():
    for name, config in MODELS.items():
        params = ssm_llm.init_params(config, jax.random.key(0))
        if name.endswith("-w8a8"):
            params, config = ssm_llm.quantize_weights(params, config, "w8a8")
        if "-quamba" in name:
            from ssm_llm.quant import QuantScheme, quantize_model

            calibration = jax.random.randint(jax.random.key(5), (4, 32), 0, config.vocab_size, dtype=jnp.int32)
            scheme = (
                QuantScheme.quamba2("W8A8", quantize_state=True)
                if "2" in name
                else QuantScheme.quamba("W4A8", group_size=16)
            )
            params, config = quantize_model(params, config, calibration, scheme)
        tokens = jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, config.vocab_size, dtype=jnp.int32)
        ref_logits, ref_tokens = greedy(params, config, tokens, ssm_llm.init_cache(config, BATCH, 32))
        gen_config = ssm_llm.GenerationConfig(max_new_tokens=STEPS)
        prompts = [list(map(int, row)) for row in np.asarray(tokens[:2])]
        ref_gen = ssm_llm.generate(params, config, prompts, gen_config).tokens
        options = OPTIONS if name == "qwen2-gqa" else {}
        ref_options = {k: ssm_llm.generate(params, config, prompts, v).tokens for k, v in options.items()}
        for shape in MESHES[name]:
            mesh = mesh_of(shape)
            sharded = ssm_llm.shard_params(params, config, mesh)
            cache = ssm_llm.init_cache(config, BATCH, 32, mesh=mesh)
            logits, toks = greedy(sharded, config, shard_batch(tokens, mesh), cache)
            gen = ssm_llm.generate(sharded, config, prompts, gen_config).tokens
            options_equal = {
                k: ssm_llm.generate(sharded, config, prompts, v).tokens == ref_options[k] for k, v in options.items()
            }
            print(
                json.dumps(
                    {
                        "model": name,
                        "mesh": list(shape),
                        "logits_diff": float(np.abs(logits - ref_logits).max()),
                        "tokens_equal": bool((toks == ref_tokens).all()),
                        "generate_equal": gen == ref_gen,
                        "options_equal": options_equal,
                        "param_shards": shard_shapes(sharded),
                        "param_specs": specs(sharded),
                        "cache_shards": shard_shapes(cache),
                        "planned": None if "-quamba" in name else dataclasses.asdict(plan(config, mesh, BATCH, 32)),
                        "held_weights": held(sharded),
                        "held_cache": held(cache),
                        "devices": len(jax.tree.leaves(sharded)[0].sharding.device_set),
                    }
                ),
                flush=True,
            )


def loading():
    """converters.load(mesh=) of a tiny Hugging Face Llama directory, and an orbax round trip of the
    sharded params: the leaves' shardings and values."""
    import sys
    import tempfile
    from pathlib import Path

    import converters  # before tests/ goes on the path: tests/converters would shadow the package

    sys.path.append(str(Path(__file__).parents[1]))
    from conftest import tiny_hf_model

    mesh = mesh_of((4, 2))
    with tempfile.TemporaryDirectory() as tmp:
        tiny_hf_model("llama", vocab_size=128).save_pretrained(Path(tmp) / "hf")
        config, reference = converters.load(Path(tmp) / "hf")
        _, sharded = converters.load(Path(tmp) / "hf", mesh=mesh)
        converters.save(sharded, config, Path(tmp) / "ckpt")
        w8a8, w8a8_config = ssm_llm.quantize_weights(reference, config, "w8a8")
        converters.save(ssm_llm.shard_params(w8a8, w8a8_config, mesh), w8a8_config, Path(tmp) / "w8a8")
        place_whole = converters.shard_params
        converters.shard_params = None  # a restore must read each shard itself, not place a whole tree
        try:
            _, restored = converters.load(Path(tmp) / "ckpt", mesh=mesh)
            _, restored_w8a8 = converters.load(Path(tmp) / "w8a8", mesh=mesh)
        finally:
            converters.shard_params = place_whole
        cases = (("load", reference, sharded), ("restore", reference, restored), ("restore w8a8", w8a8, restored_w8a8))
        for label, expected, tree in cases:
            equal = all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(tree), strict=True)
            )
            print(json.dumps({"loading": label, "equal": equal, "param_specs": specs(tree)}), flush=True)


def naive_attention(q, k, v, lengths):
    """Causal softmax attention in float64 numpy, key s visible to query t if s <= t and s < lengths[b]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    t, s = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None, :]
    visible = (s <= t)[None] & (s[None] < np.asarray(lengths)[:, None, None])
    scores = np.where(visible[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", weights / weights.sum(-1, keepdims=True), v)


def ring():
    """ring_attention on 8 devices (and 4 x 2 with heads split) against the float64 oracle."""
    from ssm_llm.sharding import ring_attention

    keys = jax.random.split(jax.random.key(2), 3)
    batch, steps, heads, kv_heads, dim = 3, 64, 4, 2, 16
    q = jax.random.normal(keys[0], (batch, steps, heads, dim))
    k = jax.random.normal(keys[1], (batch, steps, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, steps, kv_heads, dim))
    lengths = np.array([64, 37, 5], np.int32)  # ragged: two rows right-padded
    expected = naive_attention(q, k, v, lengths)
    real = np.arange(steps)[None, :] < lengths[:, None]  # rows past a length are padding: not compared
    cases = {
        "contiguous 8": (mesh_of((1, 8)), "model", None, False),
        "zigzag 8": (mesh_of((1, 8)), "model", None, True),
        "zigzag 4 x heads 2": (mesh_of((4, 2)), "data", "model", True),
    }
    for name, (mesh, axis, head_axis, zigzag) in cases.items():
        run = jax.jit(
            lambda q, k, v, n, mesh=mesh, axis=axis, head_axis=head_axis, zigzag=zigzag: ring_attention(
                q, k, v, mesh, axis=axis, head_axis=head_axis, lengths=n, zigzag=zigzag
            )
        )
        out = np.asarray(run(q, k, v, jnp.asarray(lengths)))
        diff = float(np.abs(out - expected)[real].max())
        print(json.dumps({"ring": name, "diff": diff}), flush=True)


def sequence_ssd():
    """ssd_sequence_parallel over 8 devices against the single-device chunked scan, from a given state."""
    from pallas_kernels.ssd import ssd_chunked_ref
    from ssm_llm.sharding import ssd_sequence_parallel

    keys = jax.random.split(jax.random.key(3), 7)
    batch, steps, heads, head_dim, groups, n = 2, 64, 4, 8, 2, 16
    x = jax.random.normal(keys[0], (batch, steps, heads, head_dim))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, steps, heads)))
    A = -jnp.exp(jax.random.normal(keys[2], (heads,)))
    B, C = (jax.random.normal(k, (batch, steps, groups, n)) for k in keys[3:5])
    D, state = jax.random.normal(keys[5], (heads,)), jax.random.normal(keys[6], (batch, heads, head_dim, n))
    y_ref, h_ref = ssd_chunked_ref(x, dt, A, B, C, D, state, chunk_size=4)
    run = jax.jit(lambda *a: ssd_sequence_parallel(*a, mesh=mesh_of((1, 8)), axis="model", chunk_size=4))
    y, h = run(x, dt, A, B, C, D, state)
    print(
        json.dumps(
            {
                "ssd": "8 devices",
                "y_rel": float(jnp.abs(y - y_ref).max() / jnp.abs(y_ref).max()),
                "state_rel": float(jnp.abs(h - h_ref).max() / jnp.abs(h_ref).max()),
            }
        ),
        flush=True,
    )


SEQUENCE_MODELS = {
    "llama-window": dataclasses.replace(MODELS["qwen2-gqa"], layer_windows=(0, 6)),  # one sliding-window layer
    "mamba2": MODELS["mamba2"],
}
SEQUENCE_MESHES = [(1, 8, 1), (2, 2, 2)]  # ("data", "seq", "model"): sequence only, and all three axes


def sequence_parallel():
    """A ragged prefill with `sequence_parallel=SequenceParallel(mesh)` (RingAttention / sequence-parallel
    SSD), composed with data and tensor parallelism, then greedy decoding without it; and `generate` with it:
    against one device. Mamba-2 also continues a second prefill chunk from the first one's state."""
    from ssm_llm.sharding import SequenceParallel

    batch, steps = 4, 29  # 29 tokens: padded inside to 8 / 16 equal blocks
    counts = np.array([29, 17, 29, 3], np.int32)
    for name, config in SEQUENCE_MODELS.items():
        params = ssm_llm.init_params(config, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(4), (batch, steps), 0, config.vocab_size, dtype=jnp.int32)
        tokens = jnp.where(jnp.arange(steps)[None, :] < counts[:, None], tokens, 0)
        real = np.arange(steps)[None, :] < counts[:, None]
        prompts = [list(map(int, row[:n])) for row, n in zip(np.asarray(tokens), counts, strict=True)]
        gen_config = ssm_llm.GenerationConfig(max_new_tokens=STEPS)
        ref_gen = ssm_llm.generate(params, config, prompts, gen_config).tokens

        def run(params, mesh=None, sp=None, config=config, tokens=tokens):
            cache = ssm_llm.init_cache(config, batch, 48, mesh=mesh)
            logits, cache = ssm_llm.forward(params, config, tokens, cache, token_counts=counts, sequence_parallel=sp)
            first = np.asarray(logits)
            nxt = jnp.argmax(logits[jnp.arange(batch), counts - 1], -1)[:, None].astype(jnp.int32)
            out = [np.asarray(nxt)[:, 0]]
            for _ in range(STEPS - 1):
                logits, cache = ssm_llm.forward(params, config, nxt, cache)
                nxt = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
                out.append(np.asarray(nxt)[:, 0])
            return first, np.stack(out, 1)

        def two_chunks(params, mesh=None, sp=None, config=config, tokens=tokens):
            cache = ssm_llm.init_cache(config, batch, 48, mesh=mesh)
            _, cache = ssm_llm.forward(params, config, tokens[:, :13], cache, sequence_parallel=sp)
            logits, _ = ssm_llm.forward(params, config, tokens[:, 13:], cache, sequence_parallel=sp)
            return np.asarray(logits)

        ref_logits, ref_tokens = run(params)
        ref_chunked = two_chunks(params) if name == "mamba2" else None
        for shape in SEQUENCE_MESHES:
            mesh = Mesh(np.array(jax.devices()[: np.prod(shape)]).reshape(shape), ("data", "seq", "model"))
            sp = SequenceParallel(mesh)
            sharded = ssm_llm.shard_params(params, config, mesh)
            logits, toks = run(sharded, mesh, sp)
            gen = ssm_llm.generate(sharded, config, prompts, gen_config, sequence_parallel=sp).tokens
            case = {
                "sequence": name,
                "mesh": list(shape),
                "logits_diff": float(np.abs(logits - ref_logits)[real].max()),
                "tokens_equal": bool((toks == ref_tokens).all()),
                "generate_equal": gen == ref_gen,
            }
            if ref_chunked is not None:
                case["chunked_diff"] = float(np.abs(two_chunks(sharded, mesh, sp) - ref_chunked).max())
            print(json.dumps(case), flush=True)


if __name__ == "__main__":
    main()
    loading()
    ring()
    sequence_ssd()
    sequence_parallel()
