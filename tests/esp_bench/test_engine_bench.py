"""`esp-bench run`: the CLI end to end on a tiny prompt file, its error paths, the prompt selection."""

from __future__ import annotations

import json

import pytest

from esp_bench import engine_bench
from esp_bench.cli import main
from esp_bench.common import load_prompts, prompt_ids, round_robin
from esp_engine.chat import render_chat

PROMPTS = [
    {"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea.", "Now shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 2?"]},
    {"question_id": 3, "category": "writing", "turns": ["Name three colors."]},
    {"question_id": 4, "category": "math", "turns": ["What is 3 * 5?"]},
]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    return path


def _model_available() -> bool:
    try:
        from esp_engine.loader import EMBEDDED_MODEL, resolve_model_dir

        resolve_model_dir(EMBEDDED_MODEL)
        return True
    except Exception:
        return False


needs_model = pytest.mark.skipif(not _model_available(), reason="embedded SmolLM2 model not available")


SUMMARY_KEYS = {"tau", "tokens_per_s", "new_tokens", "forward_calls", "wall_s", "exact_match"}
PROMPT_KEYS = {"question_id", "category", "new_tokens", "forward_calls", "wall_s", "output_ids"}
ENTRY_KEYS = {"model", "method", "settings", "device", "dtype", "summary", "per_category", "prompts",
              "machine", "command"}


@needs_model
def test_bench_end_to_end(prompts_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    # per-category 1 + limit 3 -> writing(1), math(2) only: the limit comes after the per-category cut.
    rc = main([
        "run", "--model", "smollm2-135m-instruct", "--device", "cpu", "--dtype", "float32", "--method", "ar,esp,pld:bc10", "--preset", "bc30",
        "--prompts", str(prompts_file), "--max-new-tokens", "6", "--per-category", "1",
        "--check-lossless", "--warmup", "1", "--no-progress", "--json", str(out),
    ])
    assert rc == 0
    stdout = capsys.readouterr().out
    for word in ("method", "tau", "tok/s", "exact", "per category", "writing", "math", "esp", "pld"):
        assert word in stdout

    report = json.loads(out.read_text())
    assert [e["method"] for e in report] == ["ar", "esp", "pld"]
    assert [e["preset"] for e in report] == [None, "bc30", "bc10"]
    assert report[2]["settings"]["pld_num_drafts"] == 9  # pld's own preset overrode --preset
    assert report[1]["settings"]["tree"] == [14]
    ar_outputs = [p["output_ids"] for p in report[0]["prompts"]]
    for entry in report:
        assert ENTRY_KEYS <= set(entry)
        assert entry["model"] == "smollm2-135m-instruct"
        assert entry["device"] == "cpu" and entry["dtype"] == "float32"
        assert {"platform", "cpu_count", "torch", "date"} <= set(entry["machine"])
        assert entry["command"].startswith("esp-bench run --model smollm2-135m-instruct ")
        s = entry["summary"]
        assert SUMMARY_KEYS <= set(s)
        assert s["exact_match"] == 1.0
        assert s["tau"] >= 1.0 and s["tokens_per_s"] > 0 and s["wall_s"] > 0
        prompts = entry["prompts"]
        assert [(p["question_id"], p["category"]) for p in prompts] == [(1, "writing"), (2, "math")]
        for p in prompts:
            assert PROMPT_KEYS <= set(p)
            assert 1 <= p["new_tokens"] == len(p["output_ids"]) <= 6
            assert p["forward_calls"] == p["decode_calls"] + 1
        assert [p["output_ids"] for p in prompts] == ar_outputs
        # pooled sums agree with the per-prompt rows
        assert s["new_tokens"] == sum(p["new_tokens"] for p in prompts)
        assert s["forward_calls"] == sum(p["forward_calls"] for p in prompts)
        assert s["tau"] == pytest.approx(sum(p["decode_tokens"] for p in prompts)
                                         / sum(p["decode_calls"] for p in prompts))
        assert s["tokens_per_s"] == pytest.approx(s["new_tokens"] / s["wall_s"])
        assert set(entry["per_category"]) == {"writing", "math"}
        for cat in ("writing", "math"):
            c = entry["per_category"][cat]
            assert {"tau", "tokens_per_s", "n"} <= set(c)
            assert c["n"] == 1
    assert report[0]["summary"]["tau"] == pytest.approx(1.0)
    # plain decoding: one forward pass per token (an EOS costs one more)
    for p in report[0]["prompts"]:
        assert p["forward_calls"] in (p["new_tokens"], p["new_tokens"] + 1)


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_model
def test_bench_check_lossless_adds_ar_and_counts_categories(prompts_file, tmp_path, restore_threads):
    out = tmp_path / "out.json"
    rc = main([
        "--method", "esp:bc10", "--prompts", str(prompts_file), "--max-new-tokens", "4",
        "--check-lossless", "--warmup", "0", "--no-progress", "--json", str(out), "--threads", "1",
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [e["method"] for e in report] == ["ar", "esp"]
    esp = report[1]
    assert esp["summary"]["exact_match"] == 1.0
    assert {cat: c["n"] for cat, c in esp["per_category"].items()} == {"writing": 2, "math": 2}
    assert [p["question_id"] for p in esp["prompts"]] == [1, 2, 3, 4]  # file order kept


@needs_model
def test_bench_without_check_lossless_has_null_exact_match(prompts_file, tmp_path):
    out = tmp_path / "out.json"
    rc = main(["--method", "pld", "--prompts", str(prompts_file), "--max-new-tokens", "3",
                     "--limit", "1", "--warmup", "0", "--no-progress", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert len(report) == 1 and report[0]["method"] == "pld"
    assert report[0]["summary"]["exact_match"] is None
    assert len(report[0]["prompts"]) == 1


@needs_model
def test_bench_interrupt_reports_finished_prompts(prompts_file, tmp_path, capsys, monkeypatch):
    real_run, calls = engine_bench.Runner.run, []

    def run(self, spec, prompt):
        calls.append(spec.label)
        if len(calls) == 4:  # ar and esp finished prompt 1; ar finished prompt 2; esp interrupted
            raise KeyboardInterrupt
        return real_run(self, spec, prompt)

    monkeypatch.setattr(engine_bench.Runner, "run", run)
    out = tmp_path / "out.json"
    rc = main(["--method", "ar,esp", "--prompts", str(prompts_file), "--max-new-tokens", "3",
                     "--warmup", "0", "--no-progress", "--json", str(out)])
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [len(e["prompts"]) for e in report] == [1, 1]
    assert report[0]["per_category"]["writing"]["n"] == 1


def test_load_prompts_selection(prompts_file):
    assert [p.question_id for p in load_prompts(prompts_file)] == [1, 2, 3, 4]
    assert [p.question_id for p in load_prompts(prompts_file, per_category=1)] == [1, 2]
    assert [p.question_id for p in load_prompts(prompts_file, limit=3)] == [1, 2, 3]
    assert load_prompts(prompts_file)[0].text == "Write one sentence about the sea."


def test_round_robin_spreads_any_first_prompts_over_the_categories(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "c"), (6, "c")]
    path.write_text("".join(json.dumps({"question_id": q, "category": c, "turns": ["x"]}) + "\n" for q, c in rows))
    assert [p.question_id for p in round_robin(load_prompts(path))] == [1, 4, 5, 2, 6, 3]


def test_prompt_ids_are_the_servers_chat_rendering(smol):
    tok = smol.tokenizer
    assert prompt_ids(tok, "Name three colors.") == render_chat(tok, [{"role": "user", "content": "Name three colors."}])


def test_parse_methods():
    runs = engine_bench.parse_methods("ar, esp:bc60 ,pld,hf,esp:bc60", "bc10")
    assert [r.label for r in runs] == ["ar", "esp:bc60", "pld:bc10", "hf"]
    assert runs[1].spec.num_masks == 2
    assert runs[3].spec is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "ar,esp:bc99"], "unknown preset 'bc99' for method 'esp'"),
        (["--method", "pld", "--preset", "bc60-k1"], "unknown preset 'bc60-k1' for method 'pld'"),
        (["--method", "esp", "--prompts-missing"], None),  # argparse: unknown flag
    ],
)
def test_bench_usage_errors(prompts_file, capsys, args, message):
    argv = ["--prompts", str(prompts_file), "--no-progress", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err
    if message:
        assert message in err


@needs_model
def test_bench_refuses_prompts_the_engine_would_refuse_before_running_any(prompts_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["--method", "ar", "--prompts", str(prompts_file), "--max-new-tokens", "1000000",
                 "--no-progress", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "esp-bench run: error: question 1:" in err and "maximum context length" in err
    assert not out.exists()


def test_top_level_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "serve" in out


def test_bench_missing_prompts_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["--method", "ar", "--prompts", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "prompts file not found" in err and str(missing) in err


def test_bench_bad_prompts_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "category": "x"}\n')
    assert main(["--method", "ar", "--prompts", str(path), "--no-progress"]) == 2
    assert "not a Spec-Bench question" in capsys.readouterr().err
