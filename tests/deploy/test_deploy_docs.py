"""docs/metrics.md lists exactly what server/metrics.py registers; docs/deploy.md's paths exist."""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from deploy_helpers import REPO, exported_series_names

METRICS_MD = REPO / "docs" / "metrics.md"
DEPLOY_MD = REPO / "docs" / "deploy.md"


def registered() -> dict[str, MetricWrapperBase]:
    from server.metrics import Metrics

    return {v._name: v for v in vars(Metrics()).values() if isinstance(v, MetricWrapperBase)}


def documented_rows() -> dict[str, list[str]]:
    """First series name of each reference-table row -> the row's cells."""
    rows = {}
    reference = METRICS_MD.read_text().split("## Reference", 1)[1].split("\n## ", 1)[0]
    for line in reference.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"`([^`]+)`", cells[0]).group(1)
        rows[name] = cells
    return rows


def series_name(metric: MetricWrapperBase) -> str:
    return {"counter": f"{metric._name}_total", "histogram": f"{metric._name}_bucket"}.get(
        metric._type, metric._name)


def test_every_registered_metric_is_documented():
    rows = documented_rows()
    for name, metric in registered().items():
        key = series_name(metric)
        assert key in rows, f"docs/metrics.md has no row for {key} (type {metric._type})"
        _, mtype, labels, help_text = rows[key]
        assert mtype == metric._type, key
        assert re.findall(r"`(\w+)`", labels.split("(+")[0]) == list(metric._labelnames), key
        assert metric._documentation in help_text, key
        if metric._type == "histogram":
            bounds = [b for b in metric._upper_bounds if b != float("inf")]
            assert f"Buckets: {', '.join(f'{b:g}' for b in bounds)}, +Inf." in help_text, key


def test_no_documented_metric_is_missing_from_the_server():
    names = {series_name(m) for m in registered().values()}
    assert set(documented_rows()) <= names, set(documented_rows()) - names
    for name in documented_rows():
        assert name in exported_series_names()


def test_deploy_md_paths_exist():
    text = DEPLOY_MD.read_text()
    paths = set(re.findall(r"`((?:docker|deploy|tests/deploy|docs)/[\w./{},<>|-]+?)`", text))
    assert len(paths) > 10
    for p in paths:
        if any(ch in p for ch in "{<*|") or p.endswith(".env"):  # patterns; a user's own .env
            continue
        assert (REPO / p.rstrip("/")).exists(), f"docs/deploy.md mentions {p}, which does not exist"
