"""Many devices: params and caches laid out on a `jax.sharding.Mesh` with axes ("data", "model").

mesh = jax.make_mesh((dp, tp), ("data", "model"))
params = ssm_llm.sharding.shard_params(params, config, mesh)      # Megatron layout, by `rules`
cache = ssm_llm.init_cache(config, batch, max_len, mesh=mesh)      # batch over "data", heads over "model"
logits, cache = ssm_llm.forward(params, config, shard_batch(tokens, mesh), cache)   # unchanged
print(ssm_llm.sharding.plan(config, mesh, batch, max_len))   # bytes per device
out = ring_attention(q, k, v, jax.make_mesh((8,), ("seq",)))      # a long prompt's causal attention
sp = SequenceParallel(jax.make_mesh((1, 4, 2), ("data", "seq", "model")))
logits, cache = ssm_llm.forward(params, config, long_prompt, cache, sequence_parallel=sp)   # ring prefill
"""

from ssm_llm.sharding.distributed import initialize, is_main_process
from ssm_llm.sharding.place import (
    auto_mesh,
    cache_specs,
    check_mesh,
    param_specs,
    shard_batch,
    shard_cache,
    shard_params,
    split_sizes,
)
from ssm_llm.sharding.plan import MemoryPlan, plan
from ssm_llm.sharding.ring_attention import ring_attention, zigzag_order
from ssm_llm.sharding.sequence_parallel import SequenceParallel
from ssm_llm.sharding.sequence_ssd import ssd_sequence_parallel

__all__ = [
    "MemoryPlan",
    "SequenceParallel",
    "auto_mesh",
    "cache_specs",
    "check_mesh",
    "initialize",
    "is_main_process",
    "param_specs",
    "plan",
    "ring_attention",
    "shard_batch",
    "shard_cache",
    "shard_params",
    "split_sizes",
    "ssd_sequence_parallel",
    "zigzag_order",
]
