"""SIGTERM drains a real server process: streams in flight finish, new work is refused, exit 0."""

from __future__ import annotations

import json
import signal
import threading

import httpx

from test_cli import ready_url, start

STREAM_TOKENS = 48


def stream_completion(url: str, max_tokens: int, started: threading.Event, result: dict) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                started.set()
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result["done"] = True
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result["completion_tokens"] = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        started.set()


def start_streams(url: str, count: int, max_tokens: int) -> list[tuple[threading.Thread, dict]]:
    streams = []
    for _ in range(count):
        started, result = threading.Event(), {}
        t = threading.Thread(target=stream_completion, args=(url, max_tokens, started, result), daemon=True)
        t.start()
        assert started.wait(120)
        streams.append((t, result))
    return streams


def test_sigterm_lets_streams_finish_refuses_new_work_and_exits_0() -> None:
    proc = start("--port", "0", "--max-model-len", "256", "--method", "ar", "--shutdown-timeout", "300",
                 "--log-level", "warning")
    try:
        url = ready_url(proc)
        assert httpx.get(url + "/ready", timeout=30).status_code == 200
        streams = start_streams(url, 3, STREAM_TOKENS)
        proc.send_signal(signal.SIGTERM)
        # While the streams run the listener stays open: probes answer, new work is turned away.
        r = httpx.get(url + "/ready", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        for thread, result in streams:
            thread.join(300)
            assert result == {"status": 200, "done": True, "completion_tokens": STREAM_TOKENS}, result
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "Traceback" not in proc.stderr.read()


def test_second_signal_exits_at_once() -> None:
    # A generation far longer than the test waits, and a drain that would wait for it.
    proc = start("--port", "0", "--max-model-len", "1024", "--method", "ar", "--shutdown-timeout", "600",
                 "--log-level", "warning")
    try:
        url = ready_url(proc)
        [(thread, result)] = start_streams(url, 1, 1000)
        proc.send_signal(signal.SIGTERM)
        assert httpx.get(url + "/ready", timeout=30).json()["status"] == "draining"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        thread.join(60)
        assert not result.get("done"), result  # cut off, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
