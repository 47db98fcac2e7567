"""The observability metrics on the real server: queue time, KV-cache usage, recent tokens/s and
forward passes saved, read back from /metrics after real generations."""

from __future__ import annotations

import re

import pytest

from serverutil import CHAT_MESSAGES, COMPLETION_PROMPT, LONG_PROMPT, ServerHandle

MODEL = "smollm2-135m-instruct"


def scrape(server: ServerHandle) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, for every sample /metrics serves."""
    with server.http(auth=False) as http:
        text = http.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        out[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(matches)


def methods(samples: dict) -> set[str]:
    return {dict(ls)["method"] for (n, ls) in samples if n == "esp:forward_calls_total"}


def test_new_metrics_after_requests(server) -> None:
    client = server.client()
    before = scrape(server)
    client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=12, temperature=0,
                              extra_body={"spec_method": "esp"})
    client.chat.completions.create(model=MODEL, messages=CHAT_MESSAGES, max_tokens=12, temperature=0,
                                   extra_body={"spec_method": "pld"})
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # One queue-time observation per engine request, with the same count as TTFT.
    assert delta("vllm:request_queue_time_seconds_count", model_name=MODEL) == 2
    assert delta("vllm:time_to_first_token_seconds_count", model_name=MODEL) == 2
    # Queue time ends when a request is first scheduled, before its prefill pass: within its TTFT.
    queue_sum = delta("vllm:request_queue_time_seconds_sum", model_name=MODEL)
    assert 0 < queue_sum < delta("vllm:time_to_first_token_seconds_sum", model_name=MODEL)

    usage = value(after, "vllm:kv_cache_usage_perc", model_name=MODEL)
    assert usage == pytest.approx(0.0, abs=1e-9)  # both finished: their blocks are back (cached prefixes count as free)

    # Right after a generation the 10 s window holds its tokens.
    assert value(after, "esp:generation_tokens_per_second", model_name=MODEL) > 0

    assert {"esp", "pld"} <= methods(after)
    for method in methods(after):
        saved = value(after, "esp:forward_calls_saved_total", method=method)
        committed = value(after, "esp:tokens_committed_total", method=method)
        calls = value(after, "esp:forward_calls_total", method=method)
        assert saved == committed - calls, method  # every pass commits at least its bonus token


def test_kv_usage_while_a_request_is_live(server) -> None:
    """Above zero while a sequence holds cache; the stream is then dropped (the engine frees it)."""
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        live = value(scrape(server), "vllm:kv_cache_usage_perc", model_name=MODEL)
    assert 0.0 < live <= 1.0


def test_gauges_are_always_exposed(server) -> None:
    """A dashboard gets the gauges from any scrape, idle or not (the tokens/s one is computed when scraped)."""
    samples = scrape(server)
    for name in ("vllm:kv_cache_usage_perc", "esp:generation_tokens_per_second"):
        assert (name, frozenset({("model_name", MODEL)})) in samples, name
