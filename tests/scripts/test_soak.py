"""scripts/soak.py without a server: its counting, percentiles, leak verdict and report, its
request kinds against a scripted transport, and the loopback-only guard."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import sys
from pathlib import Path

import httpx
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
_spec = importlib.util.spec_from_file_location("esp_soak", SCRIPT)
soak = importlib.util.module_from_spec(_spec)
sys.modules["esp_soak"] = soak
_spec.loader.exec_module(soak)

EXPOSITION = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 0.0
vllm:num_requests_running{model_name="b"} %s
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a"} %s
# TYPE esp:kv_cache_bytes gauge
esp:kv_cache_bytes{model_name="a"} %s
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="a"} 99.0
"""


def test_percentiles_interpolate_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert soak.percentile(values, 50) == 3.0
    assert soak.percentile(values, 90) == pytest.approx(4.6)
    assert soak.percentile(values, 100) == 5.0 and soak.percentile(values, 0) == 1.0
    assert soak.percentile([], 50) is None
    assert soak.latency_summary([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}


def test_tally_counts_statuses_5xx_and_failures():
    t = soak.Tally()
    t.record("chat", 200, 1.0)
    t.record("chat", 200, 3.0)
    t.record("chat", 500, 0.5)
    t.record("chat_stream", 200, 2.0, ttft=0.25)
    t.record("chat_stream", "stream_without_done")
    t.record("burst", 429, 0.01)
    t.record("burst", 503, 0.02)
    t.record("bad:nan_temperature", "transport:RemoteProtocolError")
    t.record("bad:wrong_type", 400, 0.1)
    t.record("bad:not_found", 404, 0.3)
    s = t.summary()
    assert s["total"] == 10
    assert s["by_status"] == {"200": 3, "400": 1, "404": 1, "429": 1, "500": 1, "503": 1,
                              "stream_without_done": 1, "transport:RemoteProtocolError": 1}
    assert s["server_errors"] == 2
    assert s["failures"] == {"stream_without_done": 1, "transport:RemoteProtocolError": 1}
    assert s["by_kind"]["bad:nan_temperature"] == {"transport:RemoteProtocolError": 1}
    assert s["latency_s"]["chat"]["max"] == 3.0
    assert s["latency_s"]["bad"]["n"] == 2, "bad inputs share one latency row"
    assert "chat_stream" in s["ttft_s"] and s["ttft_s"]["chat_stream"]["p50"] == 0.25
    assert s["latency_s"]["rejected"] == soak.latency_summary([0.01, 0.02]), "429 and 503 apart from answers"
    assert s["latency_s"]["chat"]["n"] == 2, "a 500 has no latency row"
    assert "burst" not in s["latency_s"]


def test_gauges_are_summed_and_leaks_named():
    idle = soak.leak_verdict(soak.parse_gauges(EXPOSITION % ("0.0", "1.3877787807814457e-17", "0.0")))
    assert idle["leaked"] is False, "a rounding residue of the usage gauge holds no block"
    busy = soak.leak_verdict(soak.parse_gauges(EXPOSITION % ("2.0", "0.125", "4096.0")))
    assert busy["leaked"] is True
    assert busy["leftovers"] == {"vllm:num_requests_running": 2.0, "vllm:kv_cache_usage_perc": 0.125,
                                 "esp:kv_cache_bytes": 4096.0}
    held = soak.leak_verdict(soak.parse_gauges(EXPOSITION % ("0.0", "0.0", "4096.0")))
    assert held["leftovers"] == {"esp:kv_cache_bytes": 4096.0}


def _report(server_errors=0, failures=None, running="0.0"):
    t = soak.Tally()
    t.record("chat", 200, 0.2)
    for _ in range(server_errors):
        t.record("chat", 500, 0.1)
    for name, n in (failures or {}).items():
        for _ in range(n):
            t.record("chat_stream", name)
    after = soak.leak_verdict(soak.parse_gauges(EXPOSITION % (running, "0.0", "0.0")))
    report = {"base_url": "http://127.0.0.1:8000", "duration_s": 60.0,
              "server": {"pid": 1, "rss": soak.rss_summary([(0.0, 100.0), (30.0, 180.0), (60.0, 150.0)], 90.0, 140.0)},
              "requests": t.summary(), "after_traffic": {**after, "settled_after_s": 1.0}}
    return report


def test_verdict_fails_on_5xx_broken_answers_and_leaks():
    assert soak.verdict(_report()) == []
    assert len(soak.verdict(_report(server_errors=2))) == 1
    assert len(soak.verdict(_report(failures={"transport:ReadError": 1}))) == 1
    assert len(soak.verdict(_report(server_errors=1, running="1.0"))) == 2


def test_table_shows_codes_memory_and_leak_state():
    report = _report(running="1.0")
    assert report["server"]["rss"]["peak_mib"] == 180.0
    table = soak.format_table(report)
    assert "200: 1" in table and "peak 180" in table and "idle after 140" in table
    assert "LEAKED" in table and "| chat | 1 | 200 |" in table
    json.dumps(report)  # the report is plain JSON


def test_thin_keeps_the_ends():
    assert soak.thin(list(range(3)), 11) == [0, 1, 2]
    out = soak.thin(list(range(100)), 5)
    assert len(out) == 5 and out[0] == 0 and out[-1] == 99


def test_only_loopback_servers_are_accepted():
    assert soak.parse_args(["--minutes", "1", "--base-url", "http://127.0.0.1:9"]).minutes == 1
    with pytest.raises(SystemExit):
        soak.parse_args(["--minutes", "1", "--base-url", "http://192.168.1.10:8000"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--minutes", "0"])


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_listening_pid_finds_the_process_on_a_port():
    import os

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert soak.listening_pid(s.getsockname()[1]) == os.getpid()
        assert soak.rss_mib(os.getpid()) > 0


def _sse(*chunks: str, done: bool = True) -> bytes:
    lines = [f"data: {c}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def _fake_server(request: httpx.Request) -> httpx.Response:
    """A server that answers valid chats and completions, refuses bad inputs with 400, and cuts
    the stream of any request whose max_tokens is 13 before [DONE]."""
    if request.method != "POST":
        return httpx.Response(405)
    try:
        body = json.loads(request.content)
    except ValueError:
        return httpx.Response(400, json={"error": {"message": "bad json"}})
    if not (body.get("messages") or body.get("prompt")) or body.get("temperature") not in (0.0, 0.8):
        return httpx.Response(400, json={"error": {"message": "bad"}})
    if body.get("stream"):
        chunk = json.dumps({"choices": [{"delta": {"content": "x"}}]})
        return httpx.Response(200, content=_sse(chunk, chunk, chunk, chunk, chunk, done=body["max_tokens"] != 13),
                              headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"choices": [{"message": {"content": "x"}}]})


def _run_kinds(kinds, rng=None):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(_fake_server), base_url="http://127.0.0.1") as c:
            s = soak.Soak(c, "m", deadline=0, rng=rng or random.Random(0))
            for kind in kinds:
                await s.one(kind)
            return s.tally.summary()
    return asyncio.run(go())


def test_each_request_kind_is_sent_and_counted():
    s = _run_kinds(["chat", "chat_stream", "chat_cancel", "completion", "completion_stream"] + ["bad"] * 20)
    for kind in ("chat", "chat_stream", "chat_cancel", "completion", "completion_stream"):
        assert s["by_kind"][kind] == {"200": 1}, kind
    assert s["ttft_s"]["chat_stream"]["n"] == 1 and s["ttft_s"]["chat_cancel"]["n"] == 1
    bad = {k: v for k, v in s["by_kind"].items() if k.startswith("bad:")}
    assert len(bad) > 5 and all(set(v) <= {"400", "405"} for v in bad.values()), bad
    assert s["server_errors"] == 0 and s["failures"] == {}


def test_a_stream_that_ends_without_done_is_a_failure():
    class Thirteen(random.Random):
        def randint(self, a, b):
            return 13

    # chat_cancel: the client would cut after 13 chunks; the server sends 5 and no [DONE].
    s = _run_kinds(["chat_stream", "chat_cancel"], rng=Thirteen(0))
    assert s["failures"] == {"stream_without_done": 1}
    assert s["by_kind"]["chat_cancel"] == {"200": 1}, "a stream the client cuts needs no [DONE]"
