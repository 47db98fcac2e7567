"""The worker thread and its queues, driven with a scripted stand-in for LLMEngine (no model)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import RequestOutput
from esp_engine.errors import InvalidRequestError
from server.async_engine import AsyncEngine, EngineDeadError
from server.metrics import Metrics

POISON = 666  # a prompt token that makes the fake engine's prefill raise


class FakeEngine:
    """Prefills one waiting request per step, else emits one token (= position) per running request."""

    def __init__(self) -> None:
        self.loaded = SimpleNamespace(tokenizer=None, max_model_len=64, name="fake")
        self.default_spec = SpecConfig.from_preset("ar")
        self.seqs: dict[str, dict] = {}
        self.aborted: list[str] = []

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

    @property
    def num_running(self):
        return sum(s["running"] for s in self.seqs.values())

    @property
    def num_waiting(self):
        return sum(not s["running"] for s in self.seqs.values())

    def kv_cache_bytes(self):
        return 0

    def step(self):
        waiting = [rid for rid, s in self.seqs.items() if not s["running"]]
        targets = waiting[:1] or list(self.seqs)
        outputs = []
        for rid in targets:
            s = self.seqs[rid]
            if POISON in s["prompt"]:
                raise RuntimeError("boom")
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
        with pytest.raises(RuntimeError, match="boom"):
            await collect(bad)
        rest = [t async for out in it for t in out.new_token_ids]
        return first.new_token_ids + rest

    assert run(main()) == list(range(1, 31))
    assert metrics.requests_aborted.labels("fake", "error")._value.get() == 1
    assert eng.is_alive


def test_abort_frees_the_request(engine) -> None:
    eng, fake, metrics = engine

    async def main():
        (s,) = await eng.add_requests([([1], SamplingParams(max_new_tokens=10_000), None)])
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
        (s,) = await eng.add_requests([([1], SamplingParams(max_new_tokens=10_000), None)])
        it = s.__aiter__()
        await it.__anext__()
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in it:
                pass
        with pytest.raises(EngineDeadError):
            await eng.add_requests([([1], SamplingParams(), None)])

    run(main())
