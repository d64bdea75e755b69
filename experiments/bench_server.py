"""Closed-loop load on `ssm-llm serve`'s application: N concurrent streaming clients (threads with the
`openai` client), each sending its next request as soon as the last one finished, for a fixed duration;
throughput, time to first token and inter-token latency (p50 / p99) per N. The server runs in this process
on 127.0.0.1 (a free port) with the embedded SmolLM2. Writes experiments/results/bench_server.{json,png}.

The peer: llama.cpp's OpenAI server (`llama-cpp-python[server]`, built from source into its own virtual
environment, whose python `--peer-python` names) on the same Q4_1 GGUF file, 2 threads, under the same load in
the same run. Completion tokens per second are counted the same way for both: the streamed text of each
request re-tokenized with SmolLM2's tokenizer.

python experiments/bench_server.py [--clients 1 8 32 64] [--seconds 20] [--max-tokens 32] [--peer-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(python: str, threads: int):
    """llama.cpp's OpenAI server on the embedded GGUF file: (process, url), once it answers."""
    port = free_port()
    command = [python, "-m", "llama_cpp.server", "--model", str(ssm_llm.default_model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)]
    command += ["--model_alias", "smollm2", "--interrupt_requests", "False"]  # queue, do not cut, concurrent ones
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5).models.list()
            return proc, url
        except openai.APIError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("llama.cpp's server did not start")


def load(url: str, clients: int, seconds: float, max_tokens: int, tokenizer) -> dict:
    """`clients` threads in a closed loop for `seconds`; every streamed chunk timed, every answer's text
    re-tokenized (completion tokens counted alike for any server)."""
    stop_at = time.perf_counter() + seconds
    ttft, itl, requests, errors, tokens = [], [], [0], [0], [0]
    lock = threading.Lock()

    def client(index: int):
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        turn = 0
        while time.perf_counter() < stop_at:
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            turn += 1
            start = last = time.perf_counter()
            got, text = [], []
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
                        text.append(chunk.choices[0].delta.content)
                        last = now
            except openai.APIError:
                with lock:
                    errors[0] += 1
                continue
            count = len(tokenizer.encode("".join(text), add_special_tokens=False))
            with lock:
                requests[0] += 1
                tokens[0] += count
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
        "completion_tokens_per_s": tokens[0] / wall,
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
    parser.add_argument("--peer-python", help="python of a virtual environment with llama-cpp-python[server]")
    args = parser.parse_args()
    tokenizer = converters.load_text_tokenizer(ssm_llm.default_model_path())
    server, front, url = start_server(args.max_slots)
    try:
        load(url, min(8, max(args.clients)), 10, args.max_tokens, tokenizer)  # warm-up: compiled shapes
        runs = []
        for clients in args.clients:
            before = front.stats()["generated_tokens"]
            row = load(url, clients, args.seconds, args.max_tokens, tokenizer)
            row["generated_tokens_per_s"] = (front.stats()["generated_tokens"] - before) / row["wall_s"]
            print(json.dumps(row), flush=True)
            runs.append(row)
    finally:
        server.should_exit = True
        front.close()
    peer_runs = []
    if args.peer_python:
        proc, peer_url = start_peer(args.peer_python, threads=os.cpu_count() or 2)
        try:
            load(peer_url, 1, 5, args.max_tokens, tokenizer)  # warm-up
            for clients in args.clients:
                row = load(peer_url, clients, args.seconds, args.max_tokens, tokenizer)
                print("llama.cpp", json.dumps(row), flush=True)
                peer_runs.append(row)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result = {
        "machine": machine_info(),
        "max_tokens": args.max_tokens,
        "max_slots": args.max_slots,
        "seconds": args.seconds,
        "runs": runs,
        "peer": {"name": "llama.cpp server (llama-cpp-python, Q4_1 GGUF)", "runs": peer_runs} if peer_runs else None,
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
    peer = (result.get("peer") or {}).get("runs", [])
    ax[0].plot(x, [r["completion_tokens_per_s"] for r in runs], "o-", label="ssm-llm serve")
    if peer:
        ax[0].plot([r["clients"] for r in peer], [r["completion_tokens_per_s"] for r in peer], "s--", label="llama.cpp")
    ax[0].set(xlabel="concurrent streaming clients", ylabel="completion tokens / s", xscale="log", title="throughput")
    ax[0].legend()
    for key in ("ttft_s", "itl_s"):
        for q in ("p50", "p99"):
            ax[1].plot(x, [r[key][q] for r in runs], "o-", label=f"{key[:-2].upper()} {q}")
            if peer:
                ax[1].plot(x, [r[key][q] for r in peer], "s--", label=f"llama.cpp {key[:-2].upper()} {q}")
    ax[1].set(xlabel="concurrent streaming clients", ylabel="seconds", xscale="log", yscale="log", title="latency")
    ax[1].legend()
    fig.suptitle(f"ssm-llm serve, SmolLM2-135M, {result['machine'].get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
