"""`esp-bench plot` and `--plot`: what `esp-bench run` and `esp-bench serve` measured, as a PNG.

    esp-bench plot docs/results/bench_cpu_2026-11-28.json -o bench.png
    esp-bench plot ar.json pld.json hybrid.json --labels ar,pld:bc10,hybrid:bc30 -o serve.png

The pictures are drawn from the reports that `--json` writes, so stored results can be drawn again:
  run report    grouped bars per Spec-Bench category (and "all", the pooled summary), one bar per
                method: tau above; below, tokens/s, or the speedup over `ar` where every report
                drawn has an `ar` entry (per category: tokens/s over `ar`'s in that category).
  serve report  one line per report (a server's method, with or without speculation) against
                concurrency: output tokens/s, TTFT p50, TPOT p50 and end-to-end p50.

matplotlib is optional (`pip install 'esp-serve[plot]'`); it is imported only to draw, and draws
with the Agg canvas (no display, no global backend switch).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .common import BenchError

MISSING_MATPLOTLIB = "plotting needs matplotlib, which is not installed: pip install 'esp-serve[plot]'"
DPI = 100


def require_matplotlib() -> None:
    """Raise BenchError naming the extra when matplotlib cannot be imported (before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(MISSING_MATPLOTLIB) from None


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def _num(value: Any) -> float:
    """A float for matplotlib: NaN (drawn as nothing) where the report has no value."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


# ---- esp-bench run ------------------------------------------------------------------------
@dataclass
class CategoryBars:
    """What one run picture shows: per series (method) one value per group (category)."""

    series: list[str]
    groups: list[str]
    tau: list[list[float]]
    speed: list[list[float]]
    speed_label: str
    title: str


def entry_label(entry: dict[str, Any]) -> str:
    return entry["method"] + (f":{entry['preset']}" if entry.get("preset") else "")


def category_bars(reports: Sequence[list[dict[str, Any]]], labels: Sequence[str] | None = None,
                  title: str | None = None) -> CategoryBars:
    """The bars of one or more `esp-bench run` reports (their entries side by side)."""
    entries = [e for report in reports for e in report]
    if not entries:
        raise BenchError("the run report has no methods to draw")
    refs = [next((e for e in report if e["method"] == "ar"), None) for report in reports]
    vs_ar = all(ref is not None for ref in refs)
    groups = list(dict.fromkeys(cat for e in entries for cat in e["per_category"])) + ["all"]

    def stats(entry: dict[str, Any], group: str) -> dict[str, Any]:
        return entry["summary"] if group == "all" else entry["per_category"].get(group, {})

    tau, speed = [], []
    for report, ref in zip(reports, refs):
        for entry in report:
            tau.append([_num(stats(entry, g).get("tau")) for g in groups])
            tps = [_num(stats(entry, g).get("tokens_per_s")) for g in groups]
            if vs_ar:
                ref_tps = [_num(stats(ref, g).get("tokens_per_s")) for g in groups]
                tps = [t / r if r else math.nan for t, r in zip(tps, ref_tps)]
            speed.append(tps)
    first = entries[0]
    n = first["summary"].get("n") or len(first.get("prompts", []))
    default_title = f"{first['model']} on {first['device']} ({first['dtype']}), {n} Spec-Bench prompts, greedy"
    return CategoryBars(_labels([entry_label(e) for e in entries], labels), groups, tau, speed,
                        "speedup vs ar (tokens/s ratio)" if vs_ar else "tokens/s", title or default_title)


def plot_run(report: list[dict[str, Any]] | Sequence[list[dict[str, Any]]], path: str | Path,
             labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Draw an `esp-bench run` report (or several) to the PNG `path`; returns the path."""
    reports = [report] if report and isinstance(report[0], dict) else list(report)
    bars = category_bars(reports, labels, title)
    n_series, n_groups = len(bars.series), len(bars.groups)
    fig = _figure(min(24.0, max(8.0, 2.0 + 0.13 * n_series * n_groups)), 8.0)
    ax_tau, ax_speed = fig.subplots(2, 1, sharex=True)
    colors = _colors(n_series)
    width = 0.8 / n_series
    for i, label in enumerate(bars.series):
        xs = [g + (i - (n_series - 1) / 2) * width for g in range(n_groups)]
        ax_tau.bar(xs, bars.tau[i], width, label=label, color=colors[i])
        ax_speed.bar(xs, bars.speed[i], width, color=colors[i])
    ax_tau.set_ylabel("tau (tokens per decode pass)")
    ax_speed.set_ylabel(bars.speed_label)
    for ax in (ax_tau, ax_speed):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    ax_tau.axhline(1.0, color="black", linewidth=0.8)
    if bars.speed_label.startswith("speedup"):
        ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xticks(range(n_groups), bars.groups, rotation=30, ha="right")
    ax_speed.set_xlim(-0.6, n_groups - 0.4)
    fig.suptitle(bars.title)
    fig.legend(loc="outside lower center", ncol=min(n_series, 8), frameon=False)
    return _save(fig, path)


# ---- esp-bench serve ----------------------------------------------------------------------
SERVE_PANELS = (  # (title, level key, statistic, scale to the unit)
    ("output tokens/s", "output_tokens_per_s", None, 1.0),
    ("TTFT p50 (ms)", "ttft_s", "p50", 1000.0),
    ("TPOT p50 (ms)", "tpot_s", "p50", 1000.0),
    ("end-to-end p50 (s)", "e2e_s", "p50", 1.0),
)


def serve_label(report: dict[str, Any], fallback: str = "server default") -> str:
    """The method a serve report asked for (extra body), else `fallback` (the server's own method)."""
    settings = report.get("settings", {})
    method = settings.get("spec_method")
    if not method:
        return fallback
    return method + (f":{settings['spec_preset']}" if settings.get("spec_preset") else "")


def level_value(level: dict[str, Any], key: str, stat: str | None, scale: float) -> float:
    value = level.get(key)
    if stat is not None:
        value = value.get(stat) if isinstance(value, dict) else None
    return _num(value) * scale


def plot_serve(reports: Sequence[dict[str, Any]], path: str | Path, labels: Sequence[str] | None = None,
               title: str | None = None) -> Path:
    """Draw `esp-bench serve` reports, one line each, against concurrency, to the PNG `path`."""
    if not reports or not any(r.get("levels") for r in reports):
        raise BenchError("the serve report has no finished concurrency level to draw")
    names = _labels([serve_label(r) for r in reports], labels)
    fig = _figure(11.0, 7.5)
    axes = fig.subplots(2, 2, sharex=True).flat
    colors = _colors(len(reports))
    levels = sorted({lv["concurrency"] for r in reports for lv in r.get("levels", [])})
    for ax, (panel, key, stat, scale) in zip(axes, SERVE_PANELS):
        for report, name, color in zip(reports, names, colors):
            points = sorted(report.get("levels", []), key=lambda lv: lv["concurrency"])
            ax.plot([lv["concurrency"] for lv in points], [level_value(lv, key, stat, scale) for lv in points],
                    marker="o", label=name, color=color)
        ax.set_title(panel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in fig.axes[2:]:
        ax.set_xlabel("concurrency (requests in flight)")
    first = reports[0]
    s = first.get("settings", {})
    default_title = (f"{first.get('model')}: {s.get('num_prompts')} prompts per level, "
                     f"max_tokens {s.get('max_tokens')}" + (", ignore_eos" if s.get("ignore_eos") else ""))
    fig.suptitle(title or default_title)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=min(len(reports), 6), frameon=False)
    return _save(fig, path)


def _labels(defaults: list[str], given: Sequence[str] | None) -> list[str]:
    if not given:
        return defaults
    if len(given) != len(defaults):
        raise BenchError(f"--labels gives {len(given)} names for {len(defaults)} series "
                         f"({', '.join(defaults)})")
    return list(given)


# ---- reading stored reports ---------------------------------------------------------------
def report_kind(data: Any) -> str | None:
    """"run" for an `esp-bench run` report, "serve" for an `esp-bench serve` one, else None."""
    if isinstance(data, list) and data and all(isinstance(e, dict) and {"method", "summary", "per_category"} <= set(e)
                                               for e in data):
        return "run"
    if isinstance(data, dict) and isinstance(data.get("levels"), list) and "settings" in data:
        return "serve"
    return None


def load_reports(paths: Sequence[str | Path]) -> tuple[str, list[Any]]:
    """The reports in `paths`, all of one kind; returns (kind, reports)."""
    kinds, reports = set(), []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise BenchError(f"cannot read {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise BenchError(f"{path}: not JSON ({exc})") from exc
        kind = report_kind(data)
        if kind is None:
            raise BenchError(f"{path}: neither an `esp-bench run` nor an `esp-bench serve` --json report")
        kinds.add(kind)
        reports.append(data)
    if len(kinds) > 1:
        raise BenchError("cannot draw `esp-bench run` and `esp-bench serve` reports in one picture")
    return kinds.pop(), reports


def plot_files(paths: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None,
               title: str | None = None) -> Path:
    """Draw the reports stored in `paths` (either kind) to the PNG `output`."""
    kind, reports = load_reports(paths)
    if kind == "run":
        return plot_run(reports, output, labels, title)
    if labels is None:  # a server's method is not in its report unless the requests named it
        labels = [serve_label(r, Path(p).stem) for r, p in zip(reports, paths)]
    return plot_serve(reports, output, labels, title)


# ---- the command --------------------------------------------------------------------------
DESCRIPTION = ("Draw `esp-bench run` or `esp-bench serve` --json reports as a PNG (needs matplotlib: "
               "pip install 'esp-serve[plot]').")


def add_plot_argument(p: argparse.ArgumentParser) -> None:
    """`--plot PATH` for `esp-bench run` and `esp-bench serve`."""
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the results to this PNG (needs matplotlib: pip install 'esp-serve[plot]')")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", metavar="JSON",
                   help="reports written by `esp-bench run --json` (bars per category and method) or by "
                        "`esp-bench serve --json` (one line each against concurrency)")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the picture to write")
    p.add_argument("--labels", default=None,
                   help="comma list naming the series in order: one per method entry of run reports, one per "
                        "serve report; unset, method:preset, or for a serve report without spec_method its file name")
    p.add_argument("--title", default=None, help="the picture's title; unset, the model, prompts and settings")


def run(args: argparse.Namespace, command: str) -> int:
    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    print(f"plot written to {plot_files(args.reports, args.output, labels, args.title)}")
    return 0
