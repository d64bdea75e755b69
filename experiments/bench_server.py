"""Closed-loop load on `ssm-llm serve`'s application: N concurrent streaming clients (threads with the
`openai` client), each sending its next request as soon as the last one finished, for a fixed duration;
throughput, time to first token and inter-token latency (p50 / p99) per N. The server runs in this process
on 127.0.0.1 (a free port) with the embedded SmolLM2. Writes experiments/results/bench_server.{json,png}.

llama.cpp's server as a peer is not run: `llama-cpp-python[server]` compiles llama.cpp from source, which
this 2-core machine's time budget does not allow here.

python experiments/bench_server.py [--clients 1 8 32 64] [--seconds 20] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import openai
import uvicorn
from bench_runners import machine_info

import converters
import ssm_llm
from ssm_llm.serving import AsyncEngine, Engine
from ssm_llm_cli.server import build_app

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is a Python list?",
    "Explain recursion in one sentence.",
    "Name three prime numbers.",
    "What does HTTP stand for?",
    "Why is the sky blue?",
    "Give a synonym for 'fast'.",
    "What is 12 times 12?",
    "Describe a cat in five words.",
]


def start_server(max_slots: int):
    path = ssm_llm.default_model_path()
    config, params = converters.load(path, cache=True)
    front = AsyncEngine(Engine(params, config, max_slots=max_slots, page_size=16, max_len=512, chunk=64))
    app = build_app(front, converters.load_text_tokenizer(path), "smollm2", max_waiting=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, front, f"http://127.0.0.1:{port}/v1"


def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` threads in a closed loop for `seconds`; every streamed token timed."""
    stop_at = time.perf_counter() + seconds
    ttft, itl, requests, errors = [], [], [0], [0]
    lock = threading.Lock()

    def client(index: int):
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        turn = 0
        while time.perf_counter() < stop_at:
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            turn += 1
            start = last = time.perf_counter()
            got = []
            try:
                stream = api.chat.completions.create(
                    model="smollm2",
                    messages=[{"role": "user", "content": question}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                )
                for chunk in stream:
                    now = time.perf_counter()
                    if chunk.choices and chunk.choices[0].delta.content:
                        got.append(now - (start if not got else last))
                        last = now
            except openai.APIError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                requests[0] += 1
                if got:
                    ttft.append(got[0])
                    itl.extend(got[1:])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    return {
        "clients": clients,
        "wall_s": wall,
        "requests": requests[0],
        "errors": errors[0],
        "ttft_s": _pct(ttft),
        "itl_s": _pct(itl),
        "text_chunks_per_s": (len(ttft) + len(itl)) / wall,
    }


def _pct(values) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-slots", type=int, default=32)
    args = parser.parse_args()
    server, front, url = start_server(args.max_slots)
    try:
        load(url, min(8, max(args.clients)), 10, args.max_tokens)  # warm-up: the engine's compiled shapes
        runs = []
        for clients in args.clients:
            before = front.stats()["generated_tokens"]
            row = load(url, clients, args.seconds, args.max_tokens)
            row["generated_tokens_per_s"] = (front.stats()["generated_tokens"] - before) / row["wall_s"]
            print(json.dumps(row), flush=True)
            runs.append(row)
    finally:
        server.should_exit = True
        front.close()
    result = {
        "machine": machine_info(),
        "max_tokens": args.max_tokens,
        "max_slots": args.max_slots,
        "seconds": args.seconds,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_server.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "bench_server.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    x = [r["clients"] for r in runs]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(x, [r["generated_tokens_per_s"] for r in runs], "o-")
    ax[0].set(xlabel="concurrent streaming clients", ylabel="generated tokens / s", xscale="log", title="throughput")
    for key in ("ttft_s", "itl_s"):
        for q in ("p50", "p99"):
            ax[1].plot(x, [r[key][q] for r in runs], "o-", label=f"{key[:-2].upper()} {q}")
    ax[1].set(xlabel="concurrent streaming clients", ylabel="seconds", xscale="log", yscale="log", title="latency")
    ax[1].legend()
    fig.suptitle(f"ssm-llm serve, SmolLM2-135M, {result['machine'].get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
