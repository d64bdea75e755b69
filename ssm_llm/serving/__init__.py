"""Serving many requests at once: a continuous-batching `Engine` over a paged KV cache (attention models)
or per-slot states (Mamba), with chunked prefill, prefix caching and preemption.

engine = ssm_llm.serving.Engine(params, config, max_slots=8, page_size=16)
rid = engine.submit(prompt_ids, ssm_llm.GenerationConfig(max_new_tokens=32))
events = engine.step()     # [(rid, new_token_ids, finished, finish_reason)]
outputs = engine.run()     # {rid: tokens} once idle
tokens = engine.run_batch(prompts, gen_config)   # an offline batch, scheduled for prefix reuse
async for new_ids in AsyncEngine(engine).stream(prompt_ids, gen_config): ...   # for servers
"""

from ssm_llm.serving.async_engine import AsyncEngine
from ssm_llm.serving.engine import COMPILATIONS, MAX_TOP_LOGPROBS, Engine, Event, TokenLogprobs
from ssm_llm.serving.model_step import PagePool, init_pages
from ssm_llm.serving.page_table import PageTable

__all__ = [
    "AsyncEngine",
    "COMPILATIONS",
    "Engine",
    "Event",
    "MAX_TOP_LOGPROBS",
    "PagePool",
    "PageTable",
    "TokenLogprobs",
    "init_pages",
]
