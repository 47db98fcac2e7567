"""`esp-bench serve`: the serving benchmark against a real server, its statistics, its CLI."""

from __future__ import annotations

import asyncio
import json

import pytest

from esp_bench import serve_bench
from esp_bench.cli import build_parser, main
from esp_bench.common import BenchError, load_prompts
from esp_bench.serve_bench import RequestResult, counter_totals, spec_stats, summarize

PROMPTS = [
    {"question_id": 1, "category": "writing", "turns": ["Name three colors."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 2?"]},
    {"question_id": 3, "category": "qa", "turns": ["What is the capital of France?"]},
]
STATS_KEYS = {"p50", "p99", "mean"}
LEVEL_KEYS = {"concurrency", "requests", "completed", "errors", "duration_s", "requests_per_s", "input_tokens",
              "cached_input_tokens", "output_tokens", "output_tokens_per_s", "ttft_s", "itl_s", "tpot_s", "e2e_s", "tokens_per_chunk", "tau",
              "accepted_per_draft", "counter_deltas", "error_messages"}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    return path


SYSTEM = ("You are a quiz assistant for a school. Answer every question in a few words, in plain English, "
          "and never add an explanation unless the student asks for one.")


def test_serve_benchmark_end_to_end(bench_server, prompts_file, tmp_path, capsys):
    out = tmp_path / "serve.json"
    system = tmp_path / "system.txt"
    system.write_text(SYSTEM)
    url, key = bench_server
    rc = main([
        "serve", "--base-url", url + "/v1", "--api-key", key, "--prompts", str(prompts_file),
        "--max-tokens", "8", "--concurrency", "1,2", "--spec-method", "esp", "--spec-preset", "bc10",
        "--system-prompt", f"@{system}", "--no-progress", "--json", str(out),
    ])
    assert rc == 0
    stdout = capsys.readouterr().out
    for word in ("concurrency", "req/s", "out tok/s", "ttft p50 ms", "itl p50 ms", "tau", "results written"):
        assert word in stdout

    report = json.loads(out.read_text())
    assert set(report) >= {"base_url", "model", "settings", "levels"}
    assert report["base_url"] == url + "/v1"
    assert report["model"] == "smollm2-135m-instruct"  # the first of /v1/models
    settings = report["settings"]
    assert settings["concurrency"] == [1, 2] and settings["num_prompts"] == 3 and settings["max_tokens"] == 8
    assert settings["spec_method"] == "esp" and settings["spec_preset"] == "bc10"
    assert settings["metrics_url"] == url + "/metrics"
    assert settings["system_prompt_chars"] == len(SYSTEM)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert set(lv) == LEVEL_KEYS
        assert lv["requests"] == lv["completed"] == len(PROMPTS)
        assert lv["errors"] == 0 and lv["error_messages"] == []
        assert 0 < lv["output_tokens"] <= 8 * len(PROMPTS) and lv["output_tokens_per_s"] > 0
        assert lv["input_tokens"] > 0 and lv["duration_s"] > 0 and lv["requests_per_s"] > 0
        # The warmup request already sent the system prompt: the server's prefix cache serves it.
        assert 0 < lv["cached_input_tokens"] < lv["input_tokens"]
        for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
            assert set(lv[key]) == STATS_KEYS
        assert 0 < lv["ttft_s"]["p50"] <= lv["ttft_s"]["p99"] <= lv["e2e_s"]["p99"]
        assert lv["ttft_s"]["mean"] <= lv["e2e_s"]["mean"]
        assert lv["itl_s"]["p50"] >= 0 and lv["tokens_per_chunk"] >= 1
        # Every decode pass commits at least its bonus token; the server is only ours meanwhile.
        assert lv["tau"] >= 1
        assert lv["counter_deltas"]["esp:forward_calls"] > 0


def test_serve_benchmark_counts_errors(bench_server, prompts_file):
    """A refused request (unknown spec method) is an error, not a crash; the sweep goes on."""
    url, key = bench_server
    settings = serve_bench.ServeSettings(prompts=str(prompts_file), base_url=url + "/v1",
                                         api_key=key, model="smollm2-135m-instruct", max_tokens=4,
                                         concurrency=[2], spec_method="no-such-method", warmup=0)
    prompts = load_prompts(prompts_file)
    levels: list[dict] = []
    asyncio.run(serve_bench.run_benchmark(settings, prompts, levels, progress=False))
    (level,) = levels
    assert level["requests"] == level["errors"] == 3 and level["completed"] == 0
    assert "400" in level["error_messages"][0] or "spec_method" in level["error_messages"][0]
    assert level["output_tokens"] is None and level["ttft_s"]["p50"] is None


# ---- statistics ---------------------------------------------------------------------------
def test_summarize_percentiles():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats["p50"] == 3.0 and stats["mean"] == 4.0
    assert stats["p99"] == pytest.approx(4.0 + 0.96 * 6.0)  # linear between the two largest
    assert summarize([]) == {"p50": None, "p99": None, "mean": None}
    assert summarize([0.5]) == {"p50": 0.5, "p99": 0.5, "mean": 0.5}


def test_itl_is_per_chunk_and_tpot_per_token():
    # Content chunks at 0.1 s (first token), 0.3 s and 0.7 s; the stream closes at 0.8 s with 5 tokens
    # (a speculative pass put several tokens in one chunk).
    r = RequestResult(ok=True, e2e_s=0.8, chunk_times=[0.1, 0.3, 0.7], output_tokens=5)
    assert r.ttft_s == 0.1
    assert r.itl_s == pytest.approx([0.2, 0.4])  # one gap per chunk, not divided by tokens
    assert r.tpot_s == pytest.approx((0.8 - 0.1) / 4)
    assert RequestResult(ok=True, e2e_s=0.2, chunk_times=[0.1], output_tokens=1).tpot_s is None
    assert RequestResult(ok=True, e2e_s=0.2).ttft_s is None and RequestResult(ok=True, e2e_s=0.2).itl_s == []

    level = serve_bench.level_report(1, [r, RequestResult(ok=False, e2e_s=0.05, error="boom")], 1.0, None, None)
    assert level["errors"] == 1 and level["completed"] == 1 and level["requests"] == 2
    assert level["itl_s"]["mean"] == pytest.approx(0.3) and level["tokens_per_chunk"] == pytest.approx(5 / 3)
    assert level["output_tokens_per_s"] == 5.0 and level["tau"] is None and level["error_messages"] == ["boom"]


METRICS_TEXT = """\
# HELP esp:forward_calls_total Decode forward passes (prefill excluded).
# TYPE esp:forward_calls_total counter
esp:forward_calls_total{method="esp",model_name="m"} 10.0
esp:forward_calls_total{method="pld",model_name="m"} 5.0
esp:forward_calls_total{method="ar",model_name="other"} 100.0
# HELP esp:forward_calls_created Decode forward passes (prefill excluded).
# TYPE esp:forward_calls_created gauge
esp:forward_calls_created{method="esp",model_name="m"} 1.7e+09
# HELP esp:tokens_committed_total Tokens committed by decode passes.
# TYPE esp:tokens_committed_total counter
esp:tokens_committed_total{method="esp",model_name="m"} 14.0
esp:tokens_committed_total{method="pld",model_name="m"} 9.0
# HELP vllm:spec_decode_num_drafts_total Decode passes that verified a draft.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{model_name="m"} 12.0
# HELP vllm:spec_decode_num_accepted_tokens_total Draft tokens accepted.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0
"""


def test_tau_from_metric_deltas():
    after = counter_totals(METRICS_TEXT, "m")
    assert after == {"esp:forward_calls_total": 15.0, "esp:tokens_committed_total": 23.0,
                     "vllm:spec_decode_num_drafts_total": 12.0, "vllm:spec_decode_num_accepted_tokens_total": 6.0}
    assert counter_totals(METRICS_TEXT)["esp:forward_calls_total"] == 115.0  # no model: every series
    before = {"esp:forward_calls_total": 5.0, "esp:tokens_committed_total": 8.0}  # drafts not yet exported
    stats = spec_stats(before, after)
    assert stats["tau"] == pytest.approx(15 / 10)
    assert stats["accepted_per_draft"] == pytest.approx(6 / 12)
    assert stats["counter_deltas"]["esp:forward_calls"] == 10.0
    assert spec_stats(None, after)["tau"] is None
    assert spec_stats(after, after)["tau"] is None  # no decode pass in between


# ---- the command line -----------------------------------------------------------------------
def test_cli_parses_serve_options():
    args = build_parser().parse_args(["serve", "--prompts", "q.jsonl", "--concurrency", "1,4"])
    settings = serve_bench.settings_from_args(args)
    assert settings.concurrency == [1, 4]
    assert settings.base_url == "http://127.0.0.1:8000/v1" and settings.temperature == 0.0
    assert settings.model is None and settings.extra_body() == {}
    assert settings.resolved_metrics_url() == "http://127.0.0.1:8000/metrics"
    args = build_parser().parse_args(["serve", "--prompts", "q.jsonl", "--spec-method", "pld", "--spec-preset",
                                                  "bc10", "--ignore-eos", "--base-url", "http://h:1/v1/"])
    settings = serve_bench.settings_from_args(args)
    assert settings.extra_body() == {"spec_method": "pld", "spec_preset": "bc10", "ignore_eos": True}
    assert settings.concurrency == [1, 4, 16, 32] and settings.resolved_metrics_url() == "http://h:1/metrics"
    with pytest.raises(BenchError):
        serve_bench.parse_concurrency("1,0")
    with pytest.raises(BenchError):
        serve_bench.parse_concurrency("1,x")


def test_cli_usage_errors(prompts_file, capsys):
    assert main(["serve", "--prompts", str(prompts_file), "--concurrency", "0"]) == 2
    assert "esp-bench serve: error: --concurrency levels must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--concurrency", "1,4"]) == 2  # --prompts is required
    assert "the following arguments are required: --prompts" in capsys.readouterr().err
    assert main(["serve", "--prompts", str(prompts_file) + ".missing"]) == 2
    assert "prompts file not found" in capsys.readouterr().err


def test_a_server_that_does_not_answer_is_a_runtime_error_not_a_usage_error(prompts_file, capsys):
    import socket

    with socket.socket() as sock:  # a port nobody listens on once this block closes it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["serve", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--prompts",
                 str(prompts_file), "--concurrency", "1", "--no-progress"]) == 1
    assert "esp-bench serve: error: warmup request failed" in capsys.readouterr().err
