"""Run by tests/sharding/test_sharding.py: `multiprocess_run.py single` (one process, one device) or
`multiprocess_run.py PROCESS_ID NUM_PROCESSES PORT` (one of NUM_PROCESSES processes with 4 CPU devices
each, joined through jax.distributed on 127.0.0.1:PORT). A tiny Llama and a tiny Mamba-2 are sharded over
a (2, 4) mesh of all devices and run greedily through `forward`; process 0 prints the tokens and
logits as JSON."""

import os
import sys

MULTI = sys.argv[1] != "single"
if MULTI:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import ssm_llm  # noqa: E402
from ssm_llm import sharding  # noqa: E402

if MULTI:
    process_id, num_processes, port = map(int, sys.argv[1:4])
    sharding.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=120)

MODELS = {
    "llama": ssm_llm.ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8
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
BATCH, PROMPT, STEPS = 4, 9, 5


def run(config, mesh):
    params = ssm_llm.init_params(config, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, config.vocab_size, jnp.int32))
    cache = ssm_llm.init_cache(config, BATCH, 32)
    if mesh is not None:
        params = ssm_llm.shard_params(params, config, mesh)
        cache = ssm_llm.init_cache(config, BATCH, 32, mesh=mesh)
    step = jax.jit(lambda p, t, c: ssm_llm.forward(p, config, t, c))
    put = (lambda x: sharding.shard_batch(x, mesh)) if mesh is not None else jnp.asarray
    host = (lambda x: multihost_utils.process_allgather(x, tiled=True)) if mesh is not None else np.asarray
    logits, cache = step(params, put(tokens), cache)
    first, out = np.asarray(host(logits)), []
    for _ in range(STEPS):
        nxt = np.argmax(np.asarray(host(logits))[:, -1], axis=-1)[:, None].astype(np.int32)
        out.append(nxt[:, 0].tolist())
        logits, cache = step(params, put(nxt), cache)
    return first, np.array(out).T.tolist()


def main():
    mesh = jax.make_mesh((2, 4), ("data", "model")) if MULTI else None
    for name, config in MODELS.items():
        logits, tokens = run(config, mesh)
        if sharding.is_main_process():
            print(
                json.dumps(
                    {
                        "model": name,
                        "tokens": tokens,
                        "logits": logits[:, -1].tolist(),
                        "processes": jax.process_count(),
                        "devices": jax.device_count(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
