"""Drive the synchronous `LLMEngine` from one worker thread, for many asyncio clients.

The engine is not thread-safe and a forward pass takes milliseconds to seconds, so exactly one
thread owns it: the event loop sends commands through a thread-safe queue, and the worker hands
each request's outputs back to the loop that asked (`call_soon_threadsafe`). Between two engine
steps the worker applies every queued command, so an abort frees its KV cache at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.outputs import EngineStats, RequestOutput

from .metrics import Metrics

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The worker thread has stopped; no request can be served."""


class RequestStream:
    """The outputs of one engine request, consumed on the event loop that created it."""

    def __init__(self, req_id: str, owner: "AsyncEngine", loop: asyncio.AbstractEventLoop) -> None:
        self.req_id = req_id
        self.finished = False
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def push(self, item: RequestOutput | BaseException) -> None:
        """Called by the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item

    def abort(self, reason: str = "client") -> None:
        """Stop generating and free the engine state (no-op once finished)."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.req_id, reason)


@dataclass
class _Add:
    streams: list[RequestStream]
    requests: Sequence[tuple[list[int], SamplingParams, SpecConfig | None]]
    done: concurrent.futures.Future[None]
    request_id: str | None = None  # the API response's id, for the logs
    endpoint: str | None = None
    arrival: float = field(default_factory=time.monotonic)  # when the event loop queued it


@dataclass
class _Abort:
    req_id: str
    reason: str


class _Stop:
    pass


@dataclass
class _Live:
    """Worker-side bookkeeping of one request (for routing outputs, latency metrics and its log record)."""

    stream: RequestStream
    arrival: float
    request_id: str
    endpoint: str | None
    index: int  # which of the API request's engine requests (choices, prompts) this is
    method: str
    prompt_tokens: int
    scheduled: float | None = None  # start of the first engine step that worked on it
    first_output: float | None = None
    last_output: float | None = None
    completion_tokens: int = 0  # generated tokens, the stop token included (as in the usage)
    decode_calls: int = 0
    decode_tokens: int = 0

    def finish_record(self, req_id: str, finish_reason: str, now: float) -> dict:
        """The fields of the request's info-level log record (never the prompt or the output text)."""
        return {
            "event": "request_finished",
            "request_id": self.request_id,
            "engine_request_id": req_id,
            "index": self.index,
            "endpoint": self.endpoint,
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tau": round(self.decode_tokens / self.decode_calls, 4) if self.decode_calls else None,
            "finish_reason": finish_reason,
            "queue_s": None if self.scheduled is None else round(self.scheduled - self.arrival, 6),
            "ttft_s": None if self.first_output is None else round(self.first_output - self.arrival, 6),
            "latency_s": round(now - self.arrival, 6),
        }


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self.loaded = engine.loaded
        self.default_spec = engine.default_spec
        self.metrics = metrics
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # touched by the worker thread only
        self._unscheduled: dict[str, _Live] = {}  # live requests no engine step has worked on yet
        self._dead: BaseException | None = None
        self._stats: EngineStats | None = None
        self._step_started: float | None = None  # monotonic start of the engine step now running
        self._thread = threading.Thread(target=self._run, name="esp-engine-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def liveness(self, max_step_s: float) -> str | None:
        """Why the engine cannot serve (its worker has died, or one step has run for longer than
        `max_step_s`, a hang), or None while it can."""
        if not self.is_alive:
            return "the engine worker has stopped"
        started = self._step_started
        if started is not None and time.monotonic() - started > max_step_s:
            return f"one engine step has run for more than {max_step_s:g} s"
        return None

    async def add_requests(
        self, requests: Sequence[tuple[list[int], SamplingParams, SpecConfig | None]], *,
        request_id: str | None = None, endpoint: str | None = None,
    ) -> list[RequestStream]:
        """Queue requests all-or-nothing; raises the engine's validation error before any output.

        `request_id` and `endpoint` only label the requests' log records."""
        if not self.is_alive:
            raise EngineDeadError("the engine worker is not running")
        loop = asyncio.get_running_loop()
        streams = [RequestStream(uuid.uuid4().hex, self, loop) for _ in requests]
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands.put(_Add(streams, requests, done, request_id, endpoint))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            for s in streams:  # the worker may already have added them
                s.abort("client")
            raise
        return streams

    def abort(self, req_id: str, reason: str = "client") -> None:
        self._commands.put(_Abort(req_id, reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():  # thread-local: must be entered in this thread
                while self._serve_once():
                    pass
        except BaseException as exc:  # a bug in this loop, not in a request: fail everyone
            log.exception("engine worker crashed")
            self._dead = exc
        finally:
            self._dead = self._dead or EngineDeadError("the engine has shut down")
            for rid in list(self._live):
                self._fail(rid, EngineDeadError("the engine has shut down"), "shutdown")

    def _serve_once(self) -> bool:
        busy = self._engine.has_unfinished()
        try:
            command = self._commands.get(block=not busy)
        except queue.Empty:
            command = None
        while command is not None:
            if isinstance(command, _Stop):
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        self._publish(self._engine.stats())
        if self._engine.has_unfinished():
            self._step()
        return True

    @property
    def stats(self) -> EngineStats | None:
        """The engine's load as of its latest step or command (None before the worker has run)."""
        return self._stats

    def _publish(self, stats: EngineStats) -> None:
        self._stats = stats
        if self.metrics:
            self.metrics.publish(stats)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            live = self._live.pop(command.req_id, None)
            self._unscheduled.pop(command.req_id, None)
            if live is not None and self._engine.abort_request(command.req_id):
                if self.metrics:
                    self.metrics.requests_aborted.labels(self.metrics.model_name, command.reason).inc()
                # A stop string is a normal finish ("stop") that ended the engine request early.
                self._log_finish(command.req_id, live, "stop" if command.reason == "stop_string" else "abort")
            return
        added: list[str] = []
        try:
            for i, (stream, (prompt_ids, sampling, spec)) in enumerate(zip(command.streams, command.requests)):
                self._engine.add_request(prompt_ids, sampling, spec, stream.req_id)
                added.append(stream.req_id)
                method = (spec or self.default_spec).method
                live = _Live(stream, command.arrival, command.request_id or stream.req_id, command.endpoint, i,
                             method, len(prompt_ids))
                self._live[stream.req_id] = self._unscheduled[stream.req_id] = live
                log.debug("request %s queued: method=%s prompt_token_ids=%s sampling=%s",
                          command.request_id or stream.req_id, method, prompt_ids, sampling)
        except Exception as exc:
            for rid in added:
                self._live.pop(rid, None)
                self._unscheduled.pop(rid, None)
                self._engine.abort_request(rid)
            command.done.set_exception(exc)
        else:
            command.done.set_result(None)

    def _step(self) -> None:
        started = self._step_started = time.monotonic()
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._step_started = None
            # The engine ends a request whose own work fails with an error output; what escapes
            # `step` comes from the batch as a whole, and any live request may have been in it.
            suspects = list(self._live)
            log.exception("engine step failed; failing request(s) %s", ", ".join(suspects))
            for rid in suspects:
                self._fail(rid, exc, "error")
            self._publish(self._engine.stats())
            return
        self._step_started = None
        stats = self._engine.stats()
        self._publish(stats)  # before delivery, so a client holding its last output sees current gauges
        self._note_scheduled(stats.newly_scheduled, started)
        now = time.monotonic()
        for out in outputs:
            self._deliver(out, now)

    def _note_scheduled(self, req_ids: Sequence[str], started: float) -> None:
        """Requests that left the waiting queue in the step that began at `started`: their queue
        time ends there (a request preempted back to waiting later is not counted again)."""
        for rid in req_ids:
            live = self._unscheduled.pop(rid, None)
            if live is None:
                continue
            live.scheduled = started
            if self.metrics:
                self.metrics.queue_time.labels(self.metrics.model_name).observe(started - live.arrival)

    def _fail(self, req_id: str, exc: BaseException, reason: str) -> None:
        live = self._live.pop(req_id, None)
        self._unscheduled.pop(req_id, None)
        try:
            freed = self._engine.abort_request(req_id)
        except Exception:
            log.exception("abort of %s failed", req_id)
            freed = False
        if freed and self.metrics:
            self.metrics.requests_aborted.labels(self.metrics.model_name, reason).inc()
        if live is not None:
            self._log_finish(req_id, live, "error")
            live.stream.push(exc)

    def _log_finish(self, req_id: str, live: _Live, finish_reason: str, now: float | None = None) -> None:
        if log.isEnabledFor(logging.INFO):
            record = live.finish_record(req_id, finish_reason, time.monotonic() if now is None else now)
            summary = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("event", "request_id"))
            log.info("request %s finished: %s", record["request_id"], summary, extra=record)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        live = self._live.get(out.req_id)
        if live is None:
            return
        num_new = len(out.new_token_ids) + (out.stop_token_id is not None)
        if self.metrics:
            self._observe(live, out, num_new, now)
        if live.first_output is None:
            live.first_output = now
        live.last_output = now
        live.completion_tokens += num_new
        if out.step is not None:
            live.decode_calls += 1
            live.decode_tokens += out.step.num_committed
        if out.finished:
            del self._live[out.req_id]
            self._log_finish(out.req_id, live, out.finish_reason or "stop", now)
        if out.error is not None:  # the engine isolated a failure to this request
            if self.metrics:
                self.metrics.requests_aborted.labels(self.metrics.model_name, "error").inc()
            live.stream.push(out.error)  # its own type: a client's fault maps to a 400, the engine's to a 500
            return
        live.stream.push(out)

    def _observe(self, live: _Live, out: RequestOutput, num_new: int, now: float) -> None:
        m, name = self.metrics, self.metrics.model_name  # type: ignore[union-attr]
        assert m is not None
        if live.last_output is None:
            m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
            m.prefix_cache_queries.labels(name).inc(out.num_prompt_tokens)
            m.prefix_cache_hits.labels(name).inc(out.num_cached_tokens)
            m.ttft.labels(name).observe(now - live.arrival)
        elif num_new:
            per_token = (now - live.last_output) / num_new
            for _ in range(num_new):
                m.inter_token.labels(name).observe(per_token)
        m.observe_tokens(num_new)
        if out.step is not None:
            m.observe_step(out.step)
        if out.finished:
            m.e2e.labels(name).observe(now - live.arrival)
