"""`esp-bench plot` and `--plot`: PNGs drawn from run and serve reports, and the error without matplotlib."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import pytest

from esp_bench import plots
from esp_bench.cli import main
from esp_bench.common import BenchError

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib not installed (pip install 'esp-serve[plot]')")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path) -> None:
    width, height = png_size(path)
    assert 400 <= width <= 3000 and 300 <= height <= 2000, (width, height)


def run_entry(method: str, preset: str | None, per_category: dict[str, tuple[float, float]]) -> dict:
    """An `esp-bench run` report entry: per category (tau, tokens/s), pooled as a plain mean."""
    taus = [t for t, _ in per_category.values() if t is not None]
    speeds = [s for _, s in per_category.values() if s is not None]
    return {
        "model": "tiny", "method": method, "preset": preset, "settings": {}, "device": "cpu", "dtype": "float32",
        "summary": {"tau": sum(taus) / len(taus), "tokens_per_s": sum(speeds) / len(speeds), "n": 4,
                    "speedup_vs_ar": None},
        "per_category": {cat: {"tau": t, "tokens_per_s": s, "n": 2, "exact_match": None}
                         for cat, (t, s) in per_category.items()},
        "prompts": [], "machine": {}, "command": "esp-bench run ...",
    }


RUN_REPORT = [
    run_entry("ar", None, {"writing": (1.0, 50.0), "math": (1.0, 40.0)}),
    run_entry("esp", "bc30", {"writing": (1.2, 40.0), "math": (1.4, 60.0)}),
    run_entry("pld", "bc10", {"writing": (1.5, 75.0), "math": (None, None)}),  # a value the run has not
]


def stats(p50: float | None) -> dict:
    return {"p50": p50, "p99": None if p50 is None else 2 * p50, "mean": p50}


def serve_report(method: str | None, tokens_per_s: list[float]) -> dict:
    levels = [{"concurrency": c, "output_tokens_per_s": tps, "ttft_s": stats(0.05 * c), "tpot_s": stats(0.02),
               "e2e_s": stats(1.0 + 0.1 * c), "tau": 1.2}
              for c, tps in zip([1, 4, 16], tokens_per_s)]
    return {"base_url": "http://127.0.0.1:8000/v1", "model": "tiny", "levels": levels, "command": "esp-bench serve",
            "settings": {"num_prompts": 26, "max_tokens": 64, "ignore_eos": True, "spec_method": method,
                         "spec_preset": "bc10" if method else None}}


def write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ---- the drawing --------------------------------------------------------------------------
@needs_matplotlib
def test_run_report_draws_tau_and_speedup_per_category(tmp_path):
    bars = plots.category_bars([RUN_REPORT])
    assert bars.series == ["ar", "esp:bc30", "pld:bc10"]
    assert bars.groups == ["writing", "math", "all"]
    assert bars.speed_label.startswith("speedup vs ar")
    assert bars.tau[1][:2] == [1.2, 1.4]
    assert bars.speed[0][:2] == [1.0, 1.0]
    assert bars.speed[1][:2] == pytest.approx([40 / 50, 60 / 40])  # per category, over ar's there
    assert bars.speed[1][2] == pytest.approx(50 / 45)  # "all": the pooled summaries
    assert bars.tau[2][1] != bars.tau[2][1]  # a missing value is NaN: no bar
    out = plots.plot_run(RUN_REPORT, tmp_path / "sub" / "run.png")
    assert out == tmp_path / "sub" / "run.png"
    assert_sensible_png(out)


@needs_matplotlib
def test_run_report_without_ar_draws_tokens_per_s(tmp_path):
    bars = plots.category_bars([RUN_REPORT[1:]])
    assert bars.speed_label == "tokens/s" and bars.speed[0][:2] == [40.0, 60.0]
    assert_sensible_png(plots.plot_run(RUN_REPORT[1:], tmp_path / "run.png", title="custom"))


@needs_matplotlib
def test_serve_reports_draw_one_line_each(tmp_path):
    reports = [serve_report(None, [50, 150, 300]), serve_report("pld", [60, 155, 290])]
    assert [plots.serve_label(r) for r in reports] == ["server default", "pld:bc10"]
    assert plots.level_value(reports[0]["levels"][1], "ttft_s", "p50", 1000.0) == pytest.approx(200.0)
    out = plots.plot_serve(reports, tmp_path / "serve.png", labels=["ar", "pld:bc10"])
    assert_sensible_png(out)
    with pytest.raises(BenchError, match="--labels gives 1 names for 2 series"):
        plots.plot_serve(reports, tmp_path / "x.png", labels=["ar"])
    with pytest.raises(BenchError, match="no finished concurrency level"):
        plots.plot_serve([{**reports[0], "levels": []}], tmp_path / "x.png")


# ---- esp-bench plot -----------------------------------------------------------------------
@needs_matplotlib
def test_plot_command_on_run_reports(tmp_path, capsys):
    first = write(tmp_path, "a.json", RUN_REPORT[:2])
    second = write(tmp_path, "b.json", RUN_REPORT[:1])
    out = tmp_path / "run.png"
    assert main(["plot", first, second, "-o", str(out), "--labels", "ar,esp,ar again"]) == 0
    assert f"plot written to {out}" in capsys.readouterr().out
    assert_sensible_png(out)


@needs_matplotlib
def test_plot_command_on_serve_reports_names_lines_by_file(tmp_path, monkeypatch):
    paths = [write(tmp_path, "serve_ar.json", serve_report(None, [50, 150, 300])),
             write(tmp_path, "serve_pld.json", serve_report("pld", [60, 155, 290]))]
    seen = {}
    real = plots.plot_serve

    def spy(reports, path, labels=None, title=None):
        seen["labels"] = labels
        return real(reports, path, labels, title)

    monkeypatch.setattr(plots, "plot_serve", spy)
    out = tmp_path / "serve.png"
    assert main(["plot", *paths, "-o", str(out), "--title", "two servers"]) == 0
    assert seen["labels"] == ["serve_ar", "pld:bc10"]  # no spec_method in the report: the file's name
    assert_sensible_png(out)


@pytest.mark.parametrize(
    "contents, message",
    [
        (["run", "serve"], "cannot draw `esp-bench run` and `esp-bench serve` reports in one picture"),
        (["other"], "neither an `esp-bench run` nor an `esp-bench serve` --json report"),
        (["not json"], "not JSON"),
        (["missing"], "cannot read"),
        (["run-labels"], "--labels gives 1 names for 3 series"),
    ],
)
def test_plot_command_errors(tmp_path, capsys, contents, message):
    data = {"run": RUN_REPORT, "run-labels": RUN_REPORT, "serve": serve_report(None, [1, 2, 3]),
            "other": {"date": "x", "levels": [[1]]}}
    paths = []
    for i, kind in enumerate(contents):
        path = tmp_path / f"{i}.json"
        if kind == "not json":
            path.write_text("{")
        elif kind != "missing":
            path.write_text(json.dumps(data[kind]))
        paths.append(str(path))
    extra = ["--labels", "ar"] if contents == ["run-labels"] else []
    out = tmp_path / "out.png"
    assert main(["plot", *paths, "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "esp-bench plot: error:" in err and message in err
    assert not out.exists()


def test_plot_command_needs_an_output(tmp_path, capsys):
    assert main(["plot", write(tmp_path, "a.json", RUN_REPORT)]) == 2
    assert "-o/--output" in capsys.readouterr().err


# ---- without matplotlib -------------------------------------------------------------------
@pytest.fixture
def no_matplotlib(monkeypatch):
    """`import matplotlib` fails as it does where it is not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.mark.parametrize("subcommand", ["plot", "run", "serve"])
def test_without_matplotlib_plotting_is_a_usage_error_naming_the_extra(tmp_path, capsys, no_matplotlib, subcommand):
    out = tmp_path / "out.png"
    prompts = write(tmp_path, "q.jsonl", {"question_id": 1, "category": "x", "turns": ["Hi."]})
    argv = {
        "plot": ["plot", write(tmp_path, "a.json", RUN_REPORT), "-o", str(out)],
        # Refused before any model is loaded or request sent: the check comes first.
        "run": ["run", "--method", "ar", "--prompts", prompts, "--no-progress", "--plot", str(out)],
        "serve": ["serve", "--base-url", "http://127.0.0.1:9/v1", "--prompts", prompts, "--no-progress",
                  "--plot", str(out)],
    }[subcommand]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"esp-bench {subcommand}: error: {plots.MISSING_MATPLOTLIB}" in err
    assert "Traceback" not in err
    assert not out.exists()


# ---- --plot on the benchmarks ---------------------------------------------------------------
@needs_matplotlib
def test_run_plot_draws_what_json_writes(tmp_path, capsys):
    from esp_engine.loader import EMBEDDED_MODEL, resolve_model_dir

    try:
        resolve_model_dir(EMBEDDED_MODEL)
    except Exception:
        pytest.skip("embedded SmolLM2 model not available")
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n" for i, (c, t) in
                               enumerate([("writing", "Name three colors."), ("math", "What is 2 + 2?")], 1)))
    out, report = tmp_path / "run.png", tmp_path / "run.json"
    assert main(["run", "--method", "ar,pld", "--prompts", str(prompts), "--max-new-tokens", "3", "--warmup", "0",
                 "--no-progress", "--json", str(report), "--plot", str(out)]) == 0
    assert f"plot written to {out}" in capsys.readouterr().out
    assert_sensible_png(out)
    assert plots.category_bars([json.loads(report.read_text())]).groups == ["writing", "math", "all"]


@needs_matplotlib
def test_serve_plot_draws_the_sweep(bench_server, tmp_path, capsys):
    prompts = write(tmp_path, "q.jsonl", {"question_id": 1, "category": "qa", "turns": ["What is 2 + 2?"]})
    out = tmp_path / "serve.png"
    url, key = bench_server
    assert main(["serve", "--base-url", url + "/v1", "--api-key", key, "--prompts", prompts, "--max-tokens", "4",
                 "--concurrency", "1,2", "--spec-method", "pld", "--no-progress", "--plot", str(out)]) == 0
    assert f"plot written to {out}" in capsys.readouterr().out
    assert_sensible_png(out)
