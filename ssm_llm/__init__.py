"""ssm_llm: a jitted, pure-functional JAX inference stack for attention and state-space language models.

config, params = converters.load("model.gguf")            # or ssm_llm.init_params(config, key)
cache = ssm_llm.init_cache(config, batch=4, max_len=2048)
logits, cache = ssm_llm.forward(params, config, tokens, cache)
out = ssm_llm.generate(params, config, prompts, ssm_llm.GenerationConfig(max_new_tokens=64))
params = ssm_llm.shard_params(params, config, jax.make_mesh((dp, tp), ("data", "model")))   # many devices
engine = ssm_llm.serving.Engine(params, config, max_slots=8)   # requests arriving at any time
"""

from ssm_llm import cascade, constrained_speculation, jrt, serving
from ssm_llm.cache import KVCache
from ssm_llm.config import ModelConfig, RopeConfig
from ssm_llm.config_io import config_from_dict
from ssm_llm.default_model import default_model_path
from ssm_llm.generation import BeamHypotheses, GenerationConfig, GenerationResult, generate
from ssm_llm.layer_layout import is_stacked, stack_layers, unstack_layers
from ssm_llm.model import forward, init_cache, init_params
from ssm_llm.quant.attention_weights import quantize_weights
from ssm_llm.sampling import filter_logits, sample
from ssm_llm.sharding import shard_params
from ssm_llm.ssm_cache import SSMCache
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

__all__ = [
    "constrained_speculation",
    "BeamHypotheses",
    "GenerationConfig",
    "GenerationResult",
    "KVCache",
    "Mamba2Config",
    "MambaConfig",
    "ModelConfig",
    "RopeConfig",
    "SSMCache",
    "cascade",
    "config_from_dict",
    "default_model_path",
    "filter_logits",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "is_stacked",
    "jrt",
    "quantize_weights",
    "sample",
    "serving",
    "shard_params",
    "stack_layers",
    "unstack_layers",
]
__version__ = "0.1.0"
