"""build_app on its own (Starlette's TestClient): loading state, load failure, no key, bad settings."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from esp_engine.errors import InvalidSpecConfigError, ModelLoadError
from server.app import ServerSettings, build_app


def wait_healthy(client: TestClient, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while client.get("/health").status_code != 200:
        assert time.monotonic() < end, "app never became ready"
        time.sleep(0.02)


def test_503_while_loading_then_ready(loaded) -> None:
    gate = threading.Event()
    ready = threading.Event()

    def slow_loader():
        assert gate.wait(60)
        return loaded

    app = build_app(ServerSettings(served_model_name="smol"), loader=slow_loader, on_ready=lambda _: ready.set())
    with TestClient(app) as client:
        for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("POST", "/tokenize")]:
            r = client.request(method, path, json={"model": "smol", "prompt": "hi"})
            assert r.status_code == 503, path
            assert r.json()["error"]["code"] == "model_loading"
        assert client.get("/metrics").status_code == 200  # scrapes work while loading
        gate.set()
        assert ready.wait(60)
        wait_healthy(client)
        # No key configured: the API is open.
        r = client.get("/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "smol"
        assert 'vllm:num_requests_running{model_name="smol"} 0.0' in client.get("/metrics").text


def test_load_failure_is_reported() -> None:
    errors: list[BaseException] = []

    def broken_loader():
        raise ModelLoadError("no such model")

    app = build_app(ServerSettings(), loader=broken_loader, on_error=errors.append)
    with TestClient(app) as client:
        end = time.monotonic() + 30
        while not errors:
            assert time.monotonic() < end
            time.sleep(0.01)
        r = client.get("/health")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_load_failed" and "no such model" in r.json()["error"]["message"]


def test_api_key_checked_before_the_body(loaded) -> None:
    app = build_app(ServerSettings(api_key="secret"), loader=lambda: loaded)
    with TestClient(app) as client:
        end = time.monotonic() + 30
        while client.get("/health").status_code != 200:  # the model binds in a background thread
            assert time.monotonic() < end
            time.sleep(0.01)
        r = client.post("/v1/completions", content=b"{broken")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/completions", content=b"{broken", headers={"Authorization": "Bearer secret"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"  # past the key check


@pytest.mark.parametrize("method, preset", [("medusa", "bc30"), ("esp", "bc99")])
def test_bad_default_spec_is_refused_at_build(method: str, preset: str) -> None:
    with pytest.raises(InvalidSpecConfigError):
        build_app(ServerSettings(method=method, preset=preset))


def _stalled_app(loaded, monkeypatch, step):
    from esp_engine.engine import LLMEngine

    monkeypatch.setattr(LLMEngine, "step", step)
    return build_app(ServerSettings(engine_step_timeout=0.2), loader=lambda: loaded)


def _complete_in_background(client: TestClient) -> threading.Thread:
    body = {"prompt": "Hello", "max_tokens": 2}
    worker = threading.Thread(target=lambda: client.post("/v1/completions", json=body), daemon=True)
    worker.start()
    return worker


def test_health_fails_while_one_engine_step_hangs_and_recovers_after(loaded, monkeypatch) -> None:
    from esp_engine.engine import LLMEngine

    release = threading.Event()
    real_step = LLMEngine.step

    def hanging_step(self):
        assert release.wait(60)
        return real_step(self)

    with TestClient(_stalled_app(loaded, monkeypatch, hanging_step)) as client:
        wait_healthy(client)
        worker = _complete_in_background(client)
        end = time.monotonic() + 30
        while (r := client.get("/health")).status_code == 200:
            assert time.monotonic() < end, "a hung step never failed the liveness check"
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert "more than 0.2 s" in r.json()["error"]["message"]
        release.set()
        worker.join(60)
        assert client.get("/health").status_code == 200  # the step finished: alive again


def test_health_fails_once_the_engine_worker_has_died(loaded, monkeypatch) -> None:
    def fatal_step(self):
        raise SystemExit("the worker thread is gone")  # not an Exception: the worker loop itself ends

    with TestClient(_stalled_app(loaded, monkeypatch, fatal_step)) as client:
        wait_healthy(client)
        _complete_in_background(client).join(60)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "the engine worker has stopped"
