"""A real Prometheus scrapes a live esp-serve: the scrape works end to end (content type, metric
names with colons, labels) and the speculative-decoding and latency series reach its query API."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from deploy_helpers import MODEL, find_tool

NUM_REQUESTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what: str, check, deadline_s: float):
    """Call `check` until it returns something truthy; fail naming `what` and its last answer."""
    end, last = time.monotonic() + deadline_s, None
    while time.monotonic() < end:
        try:
            last = check()
            if last:
                return last
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")  # session scope: set up before the session-scoped model
def prometheus_bin() -> str:
    return find_tool("prometheus")  # so a run without it skips (or fails, in CI) before loading anything


@pytest.fixture(scope="module")
def live_server(prometheus_bin, smol) -> Iterator[str]:
    import uvicorn

    from esp_engine.scheduler import SchedulerConfig
    from server.app import ServerSettings, build_app

    # A small KV pool: this server only ever holds one short request at a time.
    settings = ServerSettings(scheduler=SchedulerConfig(kv_cache_bytes=256 * 2**20, load_adaptive=True))
    app = build_app(settings, loader=lambda: smol)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    poll("the server's /health", lambda: httpx.get(url + "/health", timeout=5).status_code == 200, 300)
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def prometheus(prometheus_bin, live_server, tmp_path) -> Iterator[str]:
    target = live_server.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "esp-serve", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={address}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://{address}"

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-3000:]}")
            return httpx.get(url + "/-/ready", timeout=2).status_code == 200

        poll("Prometheus to be ready", ready, 20)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def query(prometheus: str, expr: str) -> float | None:
    """The single value of an instant query, None while it has no result."""
    body = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_live_server(prometheus, live_server) -> None:
    for i in range(NUM_REQUESTS):
        r = httpx.post(live_server + "/v1/completions", timeout=120,
                       json={"model": MODEL, "prompt": f"Count to {i + 3}:", "max_tokens": 8, "temperature": 0,
                             "ignore_eos": True, "spec_method": "esp"})
        assert r.status_code == 200, r.text

    poll("the target to be up", lambda: query(prometheus, 'up{job="esp-serve"}') == 1, 15)
    selector = f'{{job="esp-serve", model_name="{MODEL}"}}'
    # The latest scrape holds every request: the counts are exact, not just present.
    poll("the latency series", lambda: query(
        prometheus, f"sum(vllm:e2e_request_latency_seconds_count{selector})") == NUM_REQUESTS, 15)
    assert query(prometheus, f"sum(vllm:request_queue_time_seconds_count{selector})") == NUM_REQUESTS
    passes = query(prometheus, f'sum(esp:acceptance_length_count{{job="esp-serve", method="esp"}})')
    assert passes is not None and passes > 0
    # Every token but the first (chosen by the prefill pass) was committed by a decode pass.
    committed = query(prometheus, 'sum(esp:tokens_committed_total{method="esp"})')
    assert committed == (8 - 1) * NUM_REQUESTS
    calls = query(prometheus, 'sum(esp:forward_calls_total{method="esp"})')
    assert calls is not None and calls <= committed
    usage = query(prometheus, f"max(vllm:kv_cache_usage_perc{selector})")
    assert usage == 0.0  # every request has finished and given its blocks back (prefix-cache entries count as free)
