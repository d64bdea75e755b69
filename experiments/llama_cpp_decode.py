"""llama.cpp's decode timing for `bench_decode.py --peer-python PY`, run by that python (a virtual environment
with llama-cpp-python; it imports nothing of ssm_llm). Reads {"model", "threads", "prompts", "n",
"repeats"} as JSON on stdin, greedily generates 1 and n tokens from each prompt (batch 1: llama-cpp-python
decodes one sequence), the KV cache reset before every call so each one prefills, and prints
{"t_1_token_s", "t_n_tokens_s", "tokens"}: the medians over `repeats` after one warm-up, summed over the
prompts, and the n greedy tokens of each prompt.
"""

import json
import statistics
import sys
import time

from llama_cpp import Llama


def timed(llm: Llama, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds to prefill `prompt` and greedily generate `n` tokens (EOS does not stop it)."""
    llm.reset()  # no reuse of an earlier call's prefix
    start, out = time.perf_counter(), []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return time.perf_counter() - start, out


def main() -> None:
    job = json.load(sys.stdin)
    longest = max(len(p) for p in job["prompts"]) + job["n"] + 8
    llm = Llama(job["model"], n_ctx=longest, n_threads=job["threads"], n_batch=512, verbose=False)
    n, one, full, tokens = job["n"], [], [], []
    for prompt in job["prompts"]:
        timed(llm, prompt, 1), timed(llm, prompt, n)  # warm-up
    for _ in range(job["repeats"]):
        one.append(sum(timed(llm, prompt, 1)[0] for prompt in job["prompts"]))
        runs = [timed(llm, prompt, n) for prompt in job["prompts"]]
        full.append(sum(t for t, _ in runs))
        tokens = [out for _, out in runs]
    print(
        json.dumps({"t_1_token_s": statistics.median(one), "t_n_tokens_s": statistics.median(full), "tokens": tokens})
    )


if __name__ == "__main__":
    main()
