"""`python -m server` as a user runs it: a separate process, printing its URL once the model is ready."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines_of(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_cli_serves_and_prints_url() -> None:
    proc = start("--port", "0", "--max-model-len", "256", "--method", "pld", "--preset", "bc10",
                 "--served-model-name", "cli-smol", "--log-level", "warning", env={"ESP_SERVE_API_KEY": "k1"})
    try:
        out = lines_of(proc.stdout)
        url = None
        while url is None:
            line = out.get(timeout=300)
            assert line is not None, f"server exited early: {proc.stderr.read()}"
            match = re.search(r"listening on (http://\S+)", line)
            url = match.group(1) if match else None
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"}, timeout=30)
        assert r.json()["data"][0]["id"] == "cli-smol" and r.json()["data"][0]["max_model_len"] == 256
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k1"}, timeout=120,
                       json={"model": "cli-smol", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130  # Ctrl-C: a clean shutdown, the conventional status
        assert "Traceback" not in proc.stderr.read()


def test_cli_refuses_bad_preset_before_loading() -> None:
    proc = start("--preset", "bc99")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "bc99" in err


def test_cli_exits_when_the_model_cannot_load(tmp_path) -> None:
    proc = start("--model", str(tmp_path / "missing-model"), "--port", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "cannot load model" in err and "listening on" not in out
