"""scripts/gpu_bench.py on the CPU with --tiny: the run a GPU session makes, end to end in seconds,
with every field of its JSON and every table of its markdown there."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py"
_spec = importlib.util.spec_from_file_location("esp_gpu_bench", SCRIPT)
gpu_bench = importlib.util.module_from_spec(_spec)
sys.modules["esp_gpu_bench"] = gpu_bench
_spec.loader.exec_module(gpu_bench)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on a CPU


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    argv = ["--tiny", "--device", "cpu", "--out", str(out), "--rows", "1,4,32", "--batches", "1,2", "--repeats", "1"]
    assert gpu_bench.main(argv) == 0
    return json.loads((out / "gpu_bench.json").read_text()), (out / "gpu_bench.md").read_text()


def test_the_roofline_comes_from_the_measured_copy_bandwidth(report):
    data, _ = report
    roof = data["roofline"]
    assert roof["copy_GBps"] > 0
    assert 0 < roof["weight_bytes_read_per_step"] < roof["weight_bytes"]  # the embedding table is not read whole
    assert roof["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert data["model"]["config"] == "tiny" and data["device"]["type"] == "cpu"


def test_step_latency_is_measured_for_every_rows_and_batch(report):
    data, _ = report
    points = {(p["batch"], p["rows"]): p for p in data["step_latency"]}
    assert set(points) == {(b, r) for b in (1, 2) for r in (1, 4, 32)}
    for (batch, rows), p in points.items():
        assert p["ms"] > 0 and p["vs_one_row"] > 0
        assert p["bucket"] == f"{batch}x{rows}"  # the bench's ladder holds every measured size exactly
    assert points[(1, 1)]["vs_one_row"] == 1.0


def test_ar_is_set_against_the_roofline(report):
    data, _ = report
    assert [p["batch"] for p in data["ar"]] == [1, 2]
    for p in data["ar"]:
        assert p["tokens_per_s"] > 0 and p["roofline_tokens_per_s"] > 0
        assert p["fraction_of_roofline"] == pytest.approx(p["tokens_per_s"] / p["roofline_tokens_per_s"], abs=1e-4)


def test_esp_and_hybrid_presets_get_a_projected_speedup_from_tau(report):
    data, _ = report
    presets = {(p["method"], p["preset"], p["batch"]): p for p in data["presets"]}
    assert set(presets) == {(m, pr, b) for m in ("esp", "hybrid") for pr in ("bc10", "bc30", "bc60") for b in (1, 2)}
    esp = presets[("esp", "bc30", 1)]
    assert esp["default"] and esp["rows"] == 30 and esp["bucket"] == "1x32" and esp["tau"] == 1.21
    assert esp["projected_speedup"] == pytest.approx(esp["tau"] / esp["cost_vs_ar"], rel=2e-2)
    assert presets[("esp", "bc60", 1)]["rows"] == 60 and presets[("esp", "bc60", 1)]["num_masks"] == 2
    assert presets[("hybrid", "bc60", 1)]["projected_speedup"] is None  # no tau measured for it


def test_attention_backends_and_the_unpadded_pass_are_compared(report):
    data, _ = report
    names = {p["attention"] for p in data["attention_backends"]}
    assert names == {"sequence", "gathered", "flex", "unpadded eager (forward_batch)"}
    assert all("ms" in p for p in data["attention_backends"]), data["errors"]


def test_capture_targets_and_the_markdown_are_reported(report):
    data, md = report
    assert data["graphs"] is False and data["capture"]["graphs"] == 0  # eager on a CPU
    for key in ("ar_batch1_at_least_0.8_of_roofline", "rows32_at_most_1.15x", "rows64_at_most_1.3x",
                "esp_bc30_batch1_at_least_1.4x", "hybrid_bc30_batch32_not_below_ar", "capture_under_60s"):
        assert key in data["targets"]
    assert data["targets"]["rows64_vs_one_row_batch1"] is None  # not measured in this run
    assert data["skipped"] == [] and data["errors"] == {}
    for heading in ("## Step latency", "## Plain decoding against the roofline", "## ESP and hybrid",
                    "## Attention backends", "## Targets"):
        assert heading in md
