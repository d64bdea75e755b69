"""Where the float head's top token sits among the int8 head's logits, and how often the refined head
(`quantize_weights(..., head_residual=True)`, `ssm_llm.models.lm_head.refine_logits`) picks it: SmolLM2 W8A8 rotated
with the int8 embedding, on the quantized model's own final hidden states over held-out text (the float head is the
float32 embedding on the same states). The measurement behind `lm_head.HEAD_CANDIDATES`.

    python experiments/head_candidates.py    # -> results/head_candidates.json (~1 min)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import text_corpus  # noqa: E402
from bench_runners import machine_info  # noqa: E402

import converters  # noqa: E402
import ssm_llm  # noqa: E402
from ssm_llm.models import attention_lm  # noqa: E402
from ssm_llm.models.lm_head import logits_from_hidden  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WINDOWS, LENGTH = 8, 256


def main() -> dict:
    path = ssm_llm.default_model_path()
    config, params = converters.load(path)
    tokenizer = converters.load_tokenizer(path)
    held_out = text_corpus.load_corpus(text_corpus.SOURCES, tokenizer=tokenizer).split_tokens("eval")
    windows = text_corpus.eval_windows(held_out, LENGTH, WINDOWS)
    qparams, qconfig = ssm_llm.quantize_weights(
        params, config, "w8a8", rotation=True, embedding=True, head_residual=True
    )
    coarse = dataclasses.replace(qconfig, head_residual=False)  # the same params, the int8 logits unrefined

    @jax.jit
    def final_states(tokens):
        cache = ssm_llm.init_cache(qconfig, *tokens.shape)
        counts = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        h, _ = attention_lm.hidden_states(qparams, qconfig, tokens, cache, counts, cache_is_empty=True)
        return h.reshape(-1, h.shape[-1])

    ranks, same_int8, same_refined = [], [], []
    for start in range(0, WINDOWS, 2):
        h = final_states(jnp.asarray(windows[start : start + 2, :-1]))
        best = jnp.argmax(h @ params["embed"].T, axis=-1)
        int8 = logits_from_hidden(qparams, coarse, h)
        refined = logits_from_hidden(qparams, qconfig, h)
        ranks.append(np.asarray((int8 > jnp.take_along_axis(int8, best[:, None], axis=1)).sum(-1)))
        same_int8.append(np.asarray(jnp.argmax(int8, -1) == best))
        same_refined.append(np.asarray(jnp.argmax(refined, -1) == best))
    ranks = np.concatenate(ranks)
    result = {
        "machine": machine_info(),
        "positions": int(ranks.size),
        "float_top_token_in_int8_top": {str(k): float((ranks < k).mean()) for k in (1, 2, 3, 4, 8)},
        "float_top_token_max_int8_rank": int(ranks.max()) + 1,
        "top_token_equal_int8_head": float(np.concatenate(same_int8).mean()),
        "top_token_equal_refined_head": float(np.concatenate(same_refined).mean()),
    }
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "head_candidates.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
