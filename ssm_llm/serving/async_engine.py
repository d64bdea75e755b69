"""An asyncio front for the `Engine`: one background thread steps the engine while requests are live, and
each request's tokens arrive on its own async stream.

engine = AsyncEngine(Engine(params, config, max_slots=8))
async for tokens in engine.stream(prompt_ids, gen_config):   # lists of new token ids, as they come
    ...
engine.close()

Leaving the `async for` early (a client that disconnects) cancels the request and frees its slot and pages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator

from ssm_llm.generation import GenerationConfig
from ssm_llm.serving.engine import Engine, Event


class AsyncEngine:
    """Asyncio-friendly access to one `Engine`. Only its own thread touches the engine: submissions and
    cancellations are handed to it and applied between steps, so a caller's event loop never waits for a
    step to finish."""

    def __init__(self, engine: Engine):
        if not isinstance(engine, Engine):
            raise TypeError(f"AsyncEngine wraps an Engine, got {type(engine).__name__}")
        self.engine = engine
        self._wake = threading.Condition()
        self._inbox: list[tuple] = []
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ssm_llm-engine", daemon=True)
        self._thread.start()

    def _call(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the engine's thread before its next step; its result (or exception) as a future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the AsyncEngine is closed")
            self._inbox.append((fn, future))
            self._wake.notify()
        return future

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._inbox and not self.engine.has_work():
                    self._wake.wait()
                if self._closed:
                    break
                work, self._inbox = self._inbox, []
            for fn, future in work:
                if not future.set_running_or_notify_cancel():
                    continue  # its caller gave up before it ran
                try:
                    future.set_result(fn())
                except Exception as err:  # a bad request fails alone, in its caller
                    future.set_exception(err)
            if self.engine.has_work():
                self._deliver(self._step())
        self._shut_down()

    def _step(self) -> list[Event]:
        try:
            return self.engine.step()
        except Exception as err:  # the engine's own bookkeeping broke (a failing request is isolated inside
            self.error = err  # `step`): every live stream ends with it and the engine starts over
            self.engine.abort()
            return [Event(rid, [], True, "error", f"{type(err).__name__}: {err}") for rid in self._listeners]

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            target = self._listeners.get(event.rid)
            if target is None:
                continue
            loop, queue = target
            if event.finished:
                del self._listeners[event.rid]
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the listener's event loop is closed: nobody will read this request
                self._listeners.pop(event.rid, None)
                self.engine.cancel(event.rid)

    def _shut_down(self) -> None:
        """After close(): fail what was still queued and end every live stream (finish_reason "cancelled")."""
        with self._wake:
            work, self._inbox = self._inbox, []
        for _, future in work:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the AsyncEngine is closed"))
        self._deliver([Event(rid, [], True, "cancelled") for rid in list(self._listeners)])

    async def submit(
        self, prompt_ids, gen_config: GenerationConfig | None = None, *, logprobs: int | None = None
    ) -> tuple[int, asyncio.Queue]:
        """Queue a request: (its id, the queue its `Event`s arrive on). A bad request raises here
        (ValueError / TypeError, as `Engine.submit` does)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def register():
            rid = self.engine.submit(prompt_ids, gen_config, logprobs=logprobs)
            self._listeners[rid] = (loop, queue)
            return rid

        future = self._call(register)
        try:
            return await asyncio.wrap_future(future), queue
        except asyncio.CancelledError:  # the caller gave up; a request submitted meanwhile is cancelled
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self.cancel(f.result()))
            raise

    def cancel(self, rid: int) -> None:
        """Cancel request `rid` before the next step (its stream ends with finish_reason "cancelled")."""
        try:
            self._call(lambda: self.engine.cancel(rid))
        except RuntimeError:  # closed: every stream has ended already
            pass

    async def events(
        self, prompt_ids, gen_config: GenerationConfig | None = None, *, logprobs: int | None = None
    ) -> AsyncIterator[Event]:
        """Yield the request's `Event`s that carry tokens, as each step produces them (with log-probabilities
        if `logprobs` is given, as for `Engine.submit`); ends when it finishes, or raises RuntimeError if
        the request failed inside the engine (the others carry on). Closing the iterator early (a client
        that went away) cancels the request."""
        rid, queue = await self.submit(prompt_ids, gen_config, logprobs=logprobs)
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finished
                if event.finish_reason == "error":
                    raise RuntimeError(f"the request failed in the engine: {event.error}")
                if event.new_token_ids:
                    yield event
        finally:
            if not finished:
                self.cancel(rid)

    async def stream(self, prompt_ids, gen_config: GenerationConfig | None = None) -> AsyncIterator[list[int]]:
        """Yield the request's new token ids as each step produces them (`events`, tokens only)."""
        events = self.events(prompt_ids, gen_config)
        try:
            async for event in events:
                yield event.new_token_ids
        finally:
            await events.aclose()

    async def generate(self, prompt_ids, gen_config: GenerationConfig | None = None) -> list[int]:
        """All of the request's tokens, once it has finished."""
        return [token async for tokens in self.stream(prompt_ids, gen_config) for token in tokens]

    def stats(self) -> dict:
        """`Engine.stats()`, read on the engine's thread (waits for the current step)."""
        return self._call(self.engine.stats).result(timeout=600)

    def close(self) -> None:
        """Stop the engine's thread after its current step; live streams end (finish_reason "cancelled") and
        calls still queued fail with RuntimeError."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=600)
