"""`python -m server` as a user runs it: a separate process, printing its URL once the model is ready."""

from __future__ import annotations

import json
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
    # A shell's background job starts with SIGINT ignored and children inherit that; a user's
    # terminal does not, so give the server the default disposition the tests mean to exercise.
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def lines_of(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def ready_url(proc: subprocess.Popen) -> str:
    """The URL of the ready line the server prints on stdout once its model is loaded."""
    out = lines_of(proc.stdout)
    while True:
        line = out.get(timeout=300)
        assert line is not None, f"server exited early: {proc.stderr.read()}"
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return match.group(1)


def test_cli_serves_and_prints_url() -> None:
    proc = start("--port", "0", "--max-model-len", "256", "--method", "pld", "--preset", "bc10",
                 "--served-model-name", "cli-smol", "--log-level", "warning", env={"ESP_SERVE_API_KEY": "k1"})
    try:
        url = ready_url(proc)
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


def test_cli_json_logs() -> None:
    """--log-format json: every stderr line is a JSON object (uvicorn's included), a finished request
    gets one record with its numbers, and no prompt text is logged at info level."""
    secret = "Zanzibar quokka telemetry"
    proc = start("--port", "0", "--max-model-len", "256", "--method", "pld", "--log-format", "json")
    try:
        url = ready_url(proc)
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"prompt": secret, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        response_id = r.json()["id"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    lines = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # fails on any non-JSON line
    assert all({"time", "level", "logger", "message"} <= set(rec) for rec in records)
    loggers = {rec["logger"] for rec in records}
    assert {"uvicorn.error", "uvicorn.access", "server.async_engine"} <= loggers, loggers
    (done,) = [rec for rec in records if rec.get("event") == "request_finished"]
    assert done["level"] == "info" and done["request_id"] == response_id
    assert done["endpoint"] == "completions" and done["method"] == "pld"
    assert done["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert done["completion_tokens"] == 6 and done["finish_reason"] == "length"
    assert done["tau"] >= 1.0
    assert 0 < done["ttft_s"] <= done["latency_s"]
    access = [rec for rec in records if rec["logger"] == "uvicorn.access"]
    assert any(rec["path"] == "/v1/completions" and rec["status_code"] == 200 for rec in access)
    assert "Zanzibar" not in "\n".join(lines)


def test_batching_flags_reach_the_settings_and_bad_ones_are_refused(capsys) -> None:
    from server.__main__ import main, parse_args

    args = parse_args(["--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--kv-cache-memory", "0.5",
                       "--block-size", "32", "--max-rows-per-step", "40", "--no-load-adaptive"])
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_memory) == (8, 256, 0.5)
    assert (args.block_size, args.max_rows_per_step, args.load_adaptive) == (32, 40, False)
    assert parse_args([]).load_adaptive is True
    assert parse_args([]).enable_prefix_caching is True
    assert parse_args(["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert parse_args([]).enforce_eager is False and parse_args(["--enforce-eager"]).enforce_eager is True
    assert main(["--max-num-seqs", "16", "--max-num-batched-tokens", "8"]) == 2  # before any model loads
    assert "max_num_batched_tokens" in capsys.readouterr().err
