"""`ssm-llm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the serving engine.

POST /v1/completions and /v1/chat/completions (streamed as server-sent events with "stream": true),
GET /v1/models, /health and /metrics (Prometheus text). Unknown request fields are ignored, as OpenAI does;
wrong types and bad values are 400s with an OpenAI-style error body; a full queue is a 429 with
Retry-After; a client that disconnects from a stream cancels its request; a request that fails inside the
engine is a 500 (or an error event in its stream) by itself while the others carry on. /metrics has request,
token, queue and page counters and time-to-first-token / inter-token-latency histograms.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import ssm_llm
from ssm_llm.serving import MAX_TOP_LOGPROBS, AsyncEngine


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False


class CompletionRequest(_Options):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Options):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class _Histogram:
    """A Prometheus histogram: counts per upper bound, a sum and a count (memory does not grow with use)."""

    def __init__(self, name: str, bounds: tuple[float, ...]):
        self.name, self.bounds = name, bounds
        self.counts = [0] * len(bounds)
        self.sum, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
        self.sum += seconds
        self.count += 1

    def lines(self) -> list[str]:
        buckets = [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        return [
            f"# TYPE {self.name} histogram",
            *buckets,
            f'{self.name}_bucket{{le="+Inf"}} {self.count}',
            f"{self.name}_sum {self.sum}",
            f"{self.name}_count {self.count}",
        ]


class _Metrics:
    """Counters and latency histograms for /metrics."""

    def __init__(self):
        self.requests = {"completions": 0, "chat": 0}
        self.errors = 0
        self.failures = 0  # requests that failed inside the engine (500s)
        self.tokens = 0
        self.ttft = _Histogram("ssm_llm_time_to_first_token_seconds", (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = _Histogram("ssm_llm_inter_token_latency_seconds", (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _logprobs_field(kind: str, scored: list, tokenizer) -> dict:
    """OpenAI's `logprobs` of a choice for `scored` [(token id, TokenLogprobs, where its text starts in the
    completion)]: the completions layout (tokens, token_logprobs, top_logprobs keyed by text, the likelier
    kept where two alternatives decode alike, text_offset) or the chat layout (content, each token's own
    bytes: a token holding part of a UTF-8 character has those bytes, not its replacement character's)."""
    if kind == "chat":

        def entry(token, logprob):
            return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

        content = [
            {**entry(token, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for token, lp, _ in scored
        ]
        return {"content": content}
    tops = []
    for _, lp, _ in scored:
        top = {}
        for i, v in lp.top:  # most likely first: a later alternative with the same text does not replace it
            top.setdefault(tokenizer.decode([i]), v)
        tops.append(top)
    return {
        "tokens": [tokenizer.decode([token]) for token, _, _ in scored],
        "token_logprobs": [lp.logprob for _, lp, _ in scored],
        "top_logprobs": tops,
        "text_offset": [offset for _, _, offset in scored],
    }


def build_app(
    front: AsyncEngine,
    tokenizer,
    model_name: str,
    max_waiting: int = 256,
    prompt_lookup: int = 0,
    kv_policy: ssm_llm.kv.StreamingLLM | None = None,
) -> FastAPI:
    """The FastAPI application serving `front` (an `AsyncEngine`) with `tokenizer` (encode / decode /
    apply_chat_template) under the model id `model_name`; more than `max_waiting` queued requests is 429.
    `prompt_lookup` > 0: greedy requests without logprobs speculate with that many prompt-lookup drafts
    (attention models; the engine lets drafts ride only while few requests decode). `kv_policy`: every request
    keeps its attention sinks and recent window only (StreamingLLM with positions="original"; not with
    `prompt_lookup`)."""
    if kv_policy is not None and prompt_lookup:
        raise ValueError("prompt lookup does not combine with StreamingLLM: a streaming request cannot speculate")
    app = FastAPI(title="ssm-llm", docs_url=None, redoc_url=None)
    metrics = _Metrics()
    drafter = ssm_llm.speculative.PromptLookup(num_tokens=prompt_lookup) if prompt_lookup else None  # checked now

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        metrics.errors += 1
        where = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, where or "malformed request")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ssm-llm"}]}

    @app.get("/metrics")
    async def prometheus():
        stats = front.engine.stats()  # plain reads of counters: no lock needed for a snapshot
        lines = [f'ssm_llm_requests_total{{endpoint="{k}"}} {v}' for k, v in metrics.requests.items()] + [
            f"ssm_llm_request_errors_total {metrics.errors}",
            f"ssm_llm_request_failures_total {metrics.failures}",
            f"ssm_llm_generated_tokens_total {metrics.tokens}",
            f"ssm_llm_running_requests {stats['running']}",
            f"ssm_llm_waiting_requests {stats['waiting']}",
            f"ssm_llm_pages_used {stats['pages_used']}",
            f"ssm_llm_pages_free {stats['pages_free']}",
            f"ssm_llm_prefix_cache_hit_tokens_total {stats['prefix_cache_hit_tokens']}",
            *metrics.ttft.lines(),
            *metrics.itl.lines(),
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def run(body: _Options, prompt_ids: list[int], kind: str):
        if body.model not in (None, model_name):
            metrics.errors += 1
            return _error(404, f"model {body.model!r} does not exist; this server has {model_name!r}", "not_found")
        if front.engine.stats()["waiting"] >= max_waiting:
            metrics.errors += 1
            full = f"the queue is full ({max_waiting} requests waiting)"
            return _error(429, full, "rate_limit", {"Retry-After": "1"})
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        want = body.logprobs if kind == "completions" else (body.top_logprobs or 0) if body.logprobs else None
        speculate = drafter is not None and body.temperature == 0 and want is None and front.engine.paged
        gen_config = ssm_llm.GenerationConfig(
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k or None,
            min_p=body.min_p,
            seed=body.seed,
            speculative=drafter if speculate else None,
            kv_compression=kv_policy,
        )
        started = time.perf_counter()
        try:
            stream = front.events(prompt_ids, gen_config, logprobs=want)
            first = await anext(stream, None)  # a bad request raises here, before any response starts
        except (ValueError, TypeError) as err:
            metrics.errors += 1
            return _error(400, str(err))
        except RuntimeError as err:  # the request failed inside the engine; the others carry on
            metrics.failures += 1
            return _error(500, str(err), "server_error")
        metrics.requests[kind] += 1
        metrics.ttft.observe(time.perf_counter() - started)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        produced = []  # the completion's token ids

        async def pieces():
            """(text delta, finish_reason or None, [(token id, TokenLogprobs)] behind the delta) as the
            tokens come, cut at a stop string."""
            tokens, sent, scored, text = produced, "", [], ""
            chunks = [] if first is None else [first]
            finish = "length"
            try:
                while True:
                    for event in chunks:
                        for j, lp in enumerate(event.logprobs or []):  # where each token's text starts
                            before = text if j == 0 else tokenizer.decode(tokens + event.new_token_ids[:j])
                            scored.append((event.new_token_ids[j], lp, len(before.rstrip("\ufffd"))))
                        tokens += event.new_token_ids
                        metrics.tokens += len(event.new_token_ids)
                    text = tokenizer.decode(tokens)
                    cut = _stop_at(text, stops)
                    if cut is not None:  # the tokens whose text starts past the stop string are not reported
                        yield text[len(sent) : cut], "stop", [s for s in scored if s[2] < cut]
                        return
                    shown = text[:-1] if text.endswith("\ufffd") else text  # an incomplete UTF-8 sequence waits
                    if len(shown) > len(sent):
                        yield shown[len(sent) :], None, scored
                        sent, scored = shown, []
                    nxt = await anext(stream, None)
                    if nxt is None:
                        break
                    # The engine's own emission times: queued events do not read as instant, and the tokens of
                    # one event (speculation) share its gap.
                    gap = (nxt.emitted_at - chunks[-1].emitted_at) / len(nxt.new_token_ids)
                    for _ in nxt.new_token_ids:
                        metrics.itl.observe(gap)
                    chunks = [nxt]
                if len(tokens) < body.max_tokens:
                    finish = "stop"  # an EOS token
                yield tokenizer.decode(tokens)[len(sent) :], finish, scored
            finally:
                await stream.aclose()

        def envelope(delta: str, finish, scored: list):
            logprobs = None if want is None else _logprobs_field(kind, scored, tokenizer)
            if kind == "chat":
                content = (
                    {"delta": {"content": delta}}
                    if body.stream
                    else {"message": {"role": "assistant", "content": delta}}
                )
                choice = {"index": 0, **content, "logprobs": logprobs, "finish_reason": finish}
                obj = "chat.completion.chunk" if body.stream else "chat.completion"
            else:
                choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}
                obj = "text_completion"
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice]}

        if body.stream:

            async def events():
                try:
                    async for delta, finish, scored in pieces():
                        yield f"data: {json.dumps(envelope(delta, finish, scored))}\n\n"
                except RuntimeError as err:  # failed inside the engine after the stream began
                    metrics.failures += 1
                    failure = {"error": {"message": str(err), "type": "server_error", "code": 500}}
                    yield f"data: {json.dumps(failure)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, finish, scored = "", "length", []
        try:
            async for delta, reason, more in pieces():
                text += delta
                finish = reason or finish
                scored += more
        except RuntimeError as err:
            metrics.failures += 1
            return _error(500, str(err), "server_error")
        out = envelope(text, finish, scored)
        used = len(produced)
        total = len(prompt_ids) + used
        out["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": used, "total_tokens": total}
        return out

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt, add_special_tokens=False)
        return await run(body, ids, "completions")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        rendered = tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        return await run(body, tokenizer.encode(rendered, add_special_tokens=False), "chat")

    return app
