"""The worker thread and its queues, driven with a scripted stand-in for LLMEngine (no model)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.errors import InvalidRequestError
from esp_engine.outputs import EngineStats, RequestOutput
from server.async_engine import AsyncEngine, EngineDeadError
from server.errors import from_exception
from server.logs import JsonFormatter
from server.metrics import Metrics, RecentRate

POISON = 666  # a prompt token whose prefill fails (the engine reports it as that request's error)
REFUSED = 667  # a prompt token the engine finds invalid only once it works on it (the client's fault)
# More tokens than the fake emits while a test runs: it steps as fast as the thread runs, so a
# busy machine let 10,000 finish before a shutdown was applied, and the stream ended normally.
ENDLESS = 10**9


class FakeEngine:
    """Prefills one waiting request per step, else emits one token (= position) per running request.
    Like LLMEngine, a request's own failure comes back as its error output; `explode` makes the
    whole step raise (a failure of the batch, not of one request)."""

    def __init__(self) -> None:
        self.loaded = SimpleNamespace(tokenizer=None, max_model_len=64, name="fake")
        self.default_spec = SpecConfig.from_preset("ar")
        self.seqs: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.scheduled: list[str] = []
        self.explode = False

    def add_request(self, prompt_ids, sampling, spec=None, req_id=None):
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        self.seqs[req_id] = {"prompt": prompt_ids, "max": sampling.max_new_tokens, "out": 0, "running": False}
        return req_id

    def abort_request(self, req_id):
        if self.seqs.pop(req_id, None) is None:
            return False
        self.aborted.append(req_id)
        return True

    def has_unfinished(self):
        return bool(self.seqs)

    def stats(self):
        running = sum(s["running"] for s in self.seqs.values())
        return EngineStats(running, len(self.seqs) - running, 64 * len(self.seqs), len(self.seqs) / 8, 0,
                           tuple(self.scheduled))

    def step(self):
        self.scheduled = []
        if self.explode:
            self.explode = False
            raise RuntimeError("the whole pass failed")
        waiting = [rid for rid, s in self.seqs.items() if not s["running"]]
        targets = waiting[:1] or list(self.seqs)
        outputs = []
        for rid in targets:
            s = self.seqs[rid]
            if not s["running"]:
                self.scheduled.append(rid)
            if POISON in s["prompt"] or REFUSED in s["prompt"]:
                error = RuntimeError("boom") if POISON in s["prompt"] else InvalidRequestError("a bad prompt after all")
                outputs.append(RequestOutput(rid, [], True, "error", len(s["prompt"]), 0, error=error))
                continue
            s["running"] = True
            s["out"] += 1
            done = s["out"] >= s["max"]
            outputs.append(RequestOutput(rid, [s["out"]], done, "length" if done else None, len(s["prompt"]), s["out"]))
        for out in outputs:
            if out.finished:
                del self.seqs[out.req_id]
        return outputs


@pytest.fixture
def engine():
    fake = FakeEngine()
    metrics = Metrics()
    metrics.bind("fake")
    eng = AsyncEngine(fake, metrics)  # type: ignore[arg-type]
    eng.start()
    yield eng, fake, metrics
    eng.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def collect(stream) -> list[int]:
    tokens = []
    async for out in stream:
        tokens += out.new_token_ids
    return tokens


def test_outputs_arrive_in_order(engine) -> None:
    eng, _, metrics = engine

    async def main():
        streams = await eng.add_requests([([1, 2], SamplingParams(max_new_tokens=5), None),
                                          ([3], SamplingParams(max_new_tokens=3), None)])
        return await asyncio.gather(*(collect(s) for s in streams))

    assert run(main()) == [[1, 2, 3, 4, 5], [1, 2, 3]]
    assert metrics.generation_tokens.labels("fake")._value.get() == 8
    assert metrics.prompt_tokens.labels("fake")._value.get() == 3


def test_add_is_all_or_nothing(engine) -> None:
    eng, fake, _ = engine

    async def main():
        with pytest.raises(InvalidRequestError):
            await eng.add_requests([([1], SamplingParams(max_new_tokens=50), None), ([], SamplingParams(), None)])

    run(main())
    assert fake.seqs == {}


def test_failing_prefill_reaches_only_its_request(engine) -> None:
    eng, fake, metrics = engine

    async def main():
        (good,) = await eng.add_requests([([1], SamplingParams(max_new_tokens=30), None)])
        it = good.__aiter__()
        first = await it.__anext__()  # good is running before the bad one arrives
        (bad,) = await eng.add_requests([([POISON], SamplingParams(max_new_tokens=5), None)])
        with pytest.raises(RuntimeError, match="^boom$") as engine_fault:
            await collect(bad)
        (refused,) = await eng.add_requests([([REFUSED], SamplingParams(max_new_tokens=5), None)])
        with pytest.raises(InvalidRequestError, match="^a bad prompt after all$") as client_fault:
            await collect(refused)
        rest = [t async for out in it for t in out.new_token_ids]
        return first.new_token_ids + rest, engine_fault.value, client_fault.value

    tokens, engine_fault, client_fault = run(main())
    assert tokens == list(range(1, 31))
    # The errors keep their type and message across the thread: a client's fault is a 400, the engine's a 500.
    assert from_exception(client_fault).status == 400 and from_exception(client_fault).message == "a bad prompt after all"
    assert from_exception(engine_fault).status == 500 and "boom" in from_exception(engine_fault).message
    assert metrics.requests_aborted.labels("fake", "error")._value.get() == 2
    assert eng.is_alive


def test_a_step_that_raises_fails_every_live_request_and_the_worker_goes_on(engine) -> None:
    eng, fake, metrics = engine

    async def main():
        fake.explode = True  # the first step after these two arrive
        streams = await eng.add_requests([([1], SamplingParams(max_new_tokens=40), None),
                                          ([2], SamplingParams(max_new_tokens=40), None)])
        for stream in streams:
            with pytest.raises(RuntimeError, match="whole pass"):
                await collect(stream)
        (again,) = await eng.add_requests([([3], SamplingParams(max_new_tokens=3), None)])
        return await collect(again)

    assert run(main()) == [1, 2, 3]
    assert fake.seqs == {} and eng.is_alive
    assert metrics.requests_aborted.labels("fake", "error")._value.get() == 2


def test_abort_frees_the_request(engine) -> None:
    eng, fake, metrics = engine

    async def main():
        (s,) = await eng.add_requests([([1], SamplingParams(max_new_tokens=ENDLESS), None)])
        async for _ in s:
            break  # closing the iterator does not abort by itself: the caller decides
        s.abort()
        (probe,) = await eng.add_requests([([2], SamplingParams(max_new_tokens=2), None)])
        await collect(probe)  # commands are applied in order, so the abort has been applied
        return s.req_id

    rid = run(main())
    assert rid in fake.aborted and rid not in fake.seqs
    assert metrics.requests_aborted.labels("fake", "client")._value.get() == 1
    assert metrics.running.labels("fake")._value.get() == 0


def test_shutdown_fails_live_requests(engine) -> None:
    eng, _, _ = engine

    async def main():
        (s,) = await eng.add_requests([([1], SamplingParams(max_new_tokens=ENDLESS), None)])
        it = s.__aiter__()
        await it.__anext__()
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in it:
                pass
        with pytest.raises(EngineDeadError):
            await eng.add_requests([([1], SamplingParams(), None)])

    run(main())


def test_queue_time_rate_and_kv_usage(engine) -> None:
    eng, _, metrics = engine

    async def main():
        streams = await eng.add_requests([([1], SamplingParams(max_new_tokens=4), None) for _ in range(3)])
        await asyncio.gather(*(collect(s) for s in streams))

    run(main())
    value = lambda name: metrics.registry.get_sample_value(name, {"model_name": "fake"})  # noqa: E731
    assert value("vllm:request_queue_time_seconds_count") == 3  # one per request, when the fake first scheduled it
    # The fake prefills one request per step: the third waited for two steps before its own.
    assert value("vllm:request_queue_time_seconds_sum") > 0
    assert value("esp:generation_tokens_per_second") == 12 / metrics.token_rate.window_s
    assert value("vllm:kv_cache_usage_perc") == 0.0  # all finished: the fake holds nothing


def test_gauges_follow_the_engine_snapshot(engine) -> None:
    eng, _, metrics = engine
    value = lambda name: metrics.registry.get_sample_value(name, {"model_name": "fake"})  # noqa: E731

    async def main():
        streams = await eng.add_requests([([1], SamplingParams(max_new_tokens=ENDLESS), None) for _ in range(2)])
        its = [s.__aiter__() for s in streams]
        for it in its:
            await it.__anext__()  # both have been prefilled and are decoding
        seen = (value("vllm:num_requests_running"), value("esp:kv_cache_bytes"), value("vllm:kv_cache_usage_perc"),
                eng.stats.num_running)
        for s in streams:
            s.abort()
        return seen

    assert run(main()) == (2, 128, 0.25, 2)


def test_preemptions_are_counted_from_the_engine_snapshots() -> None:
    metrics = Metrics()
    metrics.bind("m")
    for total in (0, 3, 3, 5):  # the engine's running total, as each step's snapshot reports it
        metrics.publish(EngineStats(1, 0, 0, 0.5, total))
    assert metrics.registry.get_sample_value("vllm:num_preemptions_total", {"model_name": "m"}) == 5


def test_recent_rate_window() -> None:
    now = [100.0]
    rate = RecentRate(window_s=10.0, clock=lambda: now[0])
    assert rate.rate() == 0.0
    rate.add(30)
    now[0] += 5
    rate.add(20)
    assert rate.rate() == 5.0
    now[0] += 5  # the first 30 leave the window
    assert rate.rate() == 2.0
    now[0] += 20
    assert rate.rate() == 0.0  # idle: back to zero


def test_finish_is_logged_as_one_json_record(engine) -> None:
    eng, _, _ = engine
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(JsonFormatter().format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("server.async_engine")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async def main():
            (s,) = await eng.add_requests([([7, 8, 9], SamplingParams(max_new_tokens=3), None)],
                                          request_id="cmpl-abc", endpoint="completions")
            await collect(s)

        run(main())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    (line,) = records
    rec = json.loads(line)
    assert rec["level"] == "info" and rec["event"] == "request_finished" and rec["request_id"] == "cmpl-abc"
    assert rec["endpoint"] == "completions" and rec["method"] == "ar" and rec["finish_reason"] == "length"
    assert rec["prompt_tokens"] == 3 and rec["completion_tokens"] == 3
    assert rec["tau"] is None  # the fake reports no decode passes
    assert 0 <= rec["queue_s"] <= rec["ttft_s"] <= rec["latency_s"]
