"""`ssm-llm serve`'s application on 127.0.0.1 (a free port, started and stopped here) with the embedded
SmolLM2: the official `openai` client, streaming and not, completions and chat, gives `generate`'s greedy
text; concurrent clients each get their own answer; bad requests are JSON 4xx errors and the server keeps
answering; a client that leaves mid-stream frees its slot and pages (seen on /metrics)."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import converters
import ssm_llm
from ssm_llm.serving import AsyncEngine, Engine
from ssm_llm_cli.server import build_app

pytestmark = pytest.mark.optimized_xla


@pytest.fixture(scope="module")
def server(smollm2):
    import uvicorn

    config, params, _, path = smollm2
    tokenizer = converters.load_text_tokenizer(path)
    front = AsyncEngine(Engine(params, config, max_slots=4, page_size=16, max_len=256, chunk=64))
    app = build_app(front, tokenizer, "smollm2", max_waiting=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(300):
        if srv.started:
            break
        time.sleep(0.1)
    assert srv.started
    yield f"http://127.0.0.1:{port}", config, params, tokenizer
    srv.should_exit = True
    thread.join(timeout=60)
    front.close()


def greedy_text(config, params, tokenizer, ids, n):
    tokens = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=n)).tokens[0]
    return tokenizer.decode(tokens)


def chat_ids(tokenizer, question):
    return tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": question}]), add_special_tokens=False
    )


def test_openai_client_gets_generates_text(server):
    import openai

    url, config, params, tokenizer = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    prompt = "The capital of France is"
    expected = greedy_text(config, params, tokenizer, tokenizer.encode(prompt, add_special_tokens=False), 8)
    done = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens == 8
    streamed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    question = "What is 2 + 2?"
    expected = greedy_text(config, params, tokenizer, chat_ids(tokenizer, question), 10)
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected
    streamed = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_logprobs_through_the_openai_client(server):
    import jax
    import openai

    url, config, params, tokenizer = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    expected = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=4)).tokens[0]
    tokens = ids + expected
    logits, _ = ssm_llm.forward(params, config, jax.numpy.asarray([tokens]), ssm_llm.init_cache(config, 1, 64))
    table = np.asarray(jax.nn.log_softmax(logits[0, len(ids) - 1 : -1]))
    chosen = [row[t] for row, t in zip(table, expected, strict=True)]
    done = client.completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0, logprobs=2)
    got = done.choices[0].logprobs
    assert got.tokens == [tokenizer.decode([t]) for t in expected]
    np.testing.assert_allclose(got.token_logprobs, chosen, atol=1e-4)
    assert [list(top) for top in got.top_logprobs] == [
        [tokenizer.decode([i]) for i in np.argsort(-row)[:2]] for row in table
    ]
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1, stream=True
    )
    content = [entry for chunk in reply if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert len(content) == 3 and all(e.logprob <= 0 and len(e.top_logprobs) == 1 for e in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob


def test_logprobs_offsets_follow_the_text_and_stop_at_a_stop_string(server):
    """text_offset is where each token's text starts in the completion (prefix decodes, right for any
    tokenizer), and the tokens after a stop string's start are not reported; streamed alike."""
    import openai

    url, config, params, tokenizer = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    expected = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=10)).tokens[0]
    full = tokenizer.decode(expected)
    starts = [len(tokenizer.decode(expected[:i])) for i in range(len(expected))]
    stop = full[starts[3] + 1 : starts[3] + 3]  # inside the 4th token's text
    cut = full.find(stop)
    kept = [i for i in range(len(expected)) if starts[i] < cut]
    done = client.completions.create(model="smollm2", prompt=ids, max_tokens=10, temperature=0, logprobs=1, stop=stop)
    got = done.choices[0]
    assert got.text == full[:cut] and got.finish_reason == "stop"
    assert got.logprobs.text_offset == [starts[i] for i in kept]
    assert got.logprobs.tokens == [tokenizer.decode([expected[i]]) for i in kept]
    streamed = client.completions.create(
        model="smollm2", prompt=ids, max_tokens=10, temperature=0, logprobs=1, stop=stop, stream=True
    )
    offsets = [o for chunk in streamed if chunk.choices[0].logprobs for o in chunk.choices[0].logprobs.text_offset]
    assert offsets == [starts[i] for i in kept]


def test_top_logprobs_keep_the_likelier_of_two_alternatives_with_one_text():
    from ssm_llm.serving import TokenLogprobs
    from ssm_llm_cli.server import _logprobs_field

    class Spelled:  # tokens 5 and 6 both read "a"
        def decode(self, ids):
            return {5: "a", 6: "a", 7: "b"}[ids[0]]

        def token_bytes(self, token):
            return b"\xe6" if token == 7 else b"a"

    scored = [(7, TokenLogprobs(-0.5, ((5, -1.0), (6, -2.0), (7, -0.5))), 0)]
    assert _logprobs_field("completions", scored, Spelled())["top_logprobs"] == [{"a": -1.0, "b": -0.5}]
    content = _logprobs_field("chat", scored, Spelled())["content"]
    assert content[0]["bytes"] == [0xE6] and content[0]["top_logprobs"][1]["bytes"] == [97]


def test_prompt_lookup_serving_gives_plain_greedy_text(server):
    from fastapi.testclient import TestClient

    _, config, params, tokenizer = server
    front = AsyncEngine(Engine(params, config, max_slots=2, page_size=16, max_len=256, chunk=64))
    try:
        client = TestClient(build_app(front, tokenizer, "smollm2", prompt_lookup=3))
        prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
        answer = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["text"] == greedy_text(config, params, tokenizer, ids, 12)
        assert front.engine.stats()["draft_tokens"] > 0
    finally:
        front.close()


def test_streaming_llm_serving_gives_generates_text(server):
    """`kv_policy=StreamingLLM(...)`: each request keeps its sinks and window; the text is `generate`'s with
    the same policy (a prompt longer than the budget, so the policy acts from the first decoded token)."""
    from fastapi.testclient import TestClient

    _, config, params, tokenizer = server
    policy = ssm_llm.kv.StreamingLLM(budget=16, sinks=4, positions="original")
    with pytest.raises(ValueError, match="does not combine with StreamingLLM"):
        build_app(None, tokenizer, "smollm2", prompt_lookup=3, kv_policy=policy)
    front = AsyncEngine(Engine(params, config, max_slots=2, page_size=4, max_len=256, chunk=64))
    try:
        client = TestClient(build_app(front, tokenizer, "smollm2", kv_policy=policy))
        prompt = "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape, and then"
        answer = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert answer.status_code == 200 and len(ids) > 16
        gen_config = ssm_llm.GenerationConfig(max_new_tokens=12, kv_compression=policy)
        expected = tokenizer.decode(ssm_llm.generate(params, config, [ids], gen_config).tokens[0])
        assert answer.json()["choices"][0]["text"] == expected
    finally:
        front.close()


def test_concurrent_clients_each_get_their_own_answer(server):
    import openai

    url, config, params, tokenizer = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    # 64 clients at once against 4 slots: 16 prompts, each sent by 4 of them (16 references to compute, not 64)
    prompts = [f"Count from {i} to {i + 5}:" for i in range(10, 26)] * 4

    def ask(prompt):
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0).choices[0].text

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, prompts))  # any 4xx / 5xx would raise here
    expected = {
        p: greedy_text(config, params, tokenizer, tokenizer.encode(p, add_special_tokens=False), 4)
        for p in set(prompts)
    }
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == expected[prompt], prompt


def request(url, method, path, body=None, raw=None):
    """(status, parsed JSON or text) of one HTTP request with the standard library's client."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"content-type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def test_bad_requests_are_json_4xx_and_the_server_keeps_serving(server):
    url, *_ = server
    cases = [
        (b"{not json", 400),
        (json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), 400),
        (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400),
        (json.dumps({"prompt": 5}).encode(), 400),
        (json.dumps({"prompt": "word " * 400, "max_tokens": 4}).encode(), 400),  # past the engine's max_len
        (json.dumps({"prompt": [1, 10**9]}).encode(), 400),
        (json.dumps({"prompt": "hi", "logprobs": 9}).encode(), 400),  # at most 5 alternatives
        (json.dumps({"prompt": "hi", "model": "gpt-9"}).encode(), 404),
    ]
    for raw, expected in cases:
        status, answer = request(url, "POST", "/v1/completions", raw=raw)
        assert status == expected, (raw[:40], answer)
        assert answer["error"]["message"]
    _, long = request(url, "POST", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4})
    assert "max_len of 256" in long["error"]["message"]
    status, ok = request(url, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "x": 1})
    assert status == 200 and ok["choices"][0]["finish_reason"] == "length"
    assert request(url, "GET", "/health") == (200, {"status": "ok"})


def test_a_request_that_fails_in_the_engine_is_a_500_alone(server, monkeypatch):
    import ssm_llm.serving.engine as engine_module

    url, config, params, tokenizer = server
    ids = tokenizer.encode("Once upon a time", add_special_tokens=False)
    expected = ssm_llm.generate(params, config, [ids], ssm_llm.GenerationConfig(max_new_tokens=6)).tokens[0]
    poison = config.vocab_size - 1
    assert poison not in ids + expected
    real = engine_module._step

    def broken(params, config, state, decode, prefill, *rest):
        if any((np.asarray(r.tokens) == poison).any() for r in (decode, prefill) if r is not None):
            raise FloatingPointError("poisoned")
        return real(params, config, state, decode, prefill, *rest)

    monkeypatch.setattr(engine_module, "_step", broken)
    good = {"prompt": ids, "max_tokens": 6, "temperature": 0}
    bad = {"prompt": [1, 2, poison], "max_tokens": 6, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(request, url, "POST", "/v1/completions", body) for body in (good, bad, good)]
        (ok, fine), (status, failed), (ok2, fine2) = [c.result() for c in calls]
    assert ok == ok2 == 200 and fine["choices"][0]["text"] == fine2["choices"][0]["text"] == tokenizer.decode(expected)
    assert status == 500 and "FloatingPointError: poisoned" in failed["error"]["message"]
    _, early = request(url, "POST", "/v1/completions", {**bad, "stream": True})
    assert "poisoned" in early["error"]["message"]  # failed before its first token: a plain 500

    def late(params, config, state, decode, prefill, *rest):  # fails once a request is 6 tokens long
        if decode is not None and int(np.asarray(decode.starts).max()) >= 6:
            raise FloatingPointError("late")
        return real(params, config, state, decode, prefill, *rest)

    monkeypatch.setattr(engine_module, "_step", late)
    status, streamed = request(url, "POST", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 9, "stream": True})
    events = [json.loads(e.removeprefix("data: ")) for e in streamed.strip().split("\n\n")[:-1]]
    assert status == 200 and streamed.endswith("data: [DONE]\n\n")
    assert all("choices" in e for e in events[:-1]) and "late" in events[-1]["error"]["message"]
    _, text = request(url, "GET", "/metrics")
    metrics = dict(line.rsplit(" ", 1) for line in text.splitlines())
    assert int(metrics["ssm_llm_request_failures_total"]) >= 2
    assert int(metrics["ssm_llm_time_to_first_token_seconds_count"]) >= 2
    assert (
        metrics['ssm_llm_inter_token_latency_seconds_bucket{le="+Inf"}']
        == metrics["ssm_llm_inter_token_latency_seconds_count"]
    )


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    url, *_ = server
    before = int(
        dict(line.rsplit(" ", 1) for line in request(url, "GET", "/metrics")[1].splitlines())[
            "ssm_llm_generated_tokens_total"
        ]
    )
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # one event, then the client goes away
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(600):
        _, text = request(url, "GET", "/metrics")
        metrics = dict(line.rsplit(" ", 1) for line in text.splitlines())
        if metrics["ssm_llm_running_requests"] == "0" and metrics["ssm_llm_waiting_requests"] == "0":
            break
        time.sleep(0.1)
    assert metrics["ssm_llm_running_requests"] == "0" and metrics["ssm_llm_pages_used"] == "0"
    assert int(metrics["ssm_llm_generated_tokens_total"]) - before < 200  # cancelled, not run to its end


def test_the_serve_command_starts_answers_and_finishes_its_streams_on_sigterm():
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssm_llm_cli", "serve", "--port", str(port), "--max-slots", "2", "--max-len", "128"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):  # converting the model on a first run takes a while
            try:
                if request(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        status, answer = request(
            url,
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
        )
        assert status == 200 and answer["object"] == "chat.completion"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        first = response.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)  # mid-stream: the stream still runs to its end
        rest = response.read().decode()
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    events = [json.loads(e.removeprefix("data: ")) for e in (first.decode() + rest).strip().split("\n\n")[:-1]]
    assert rest.endswith("data: [DONE]\n\n") and events[-1]["choices"][0]["finish_reason"] == "length", (
        first + rest.encode(),
        err[-3000:],
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: the exit is -SIGTERM, not a crash
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Traceback" not in err, err[-2000:]


def test_serve_refuses_a_bad_prompt_lookup_before_loading_the_model(capsys, monkeypatch):
    import ssm_llm_cli

    monkeypatch.setattr(ssm_llm_cli, "_load", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(ssm_llm_cli, "use_compilation_cache", lambda: pytest.fail("set process-wide options"))
    for bad in ("-2", "100000"):
        assert ssm_llm_cli.main(["serve", "--prompt-lookup", bad]) == 2
        assert "num_tokens" in capsys.readouterr().err
    assert ssm_llm_cli.main(["serve", "--streaming-llm", "4"]) == 2  # no room for a window past 4 sinks
    assert "sinks (4) must be smaller than budget (4)" in capsys.readouterr().err
    assert ssm_llm_cli.main(["serve", "--streaming-llm", "64", "--prompt-lookup", "3"]) == 2
    assert "do not combine" in capsys.readouterr().err
