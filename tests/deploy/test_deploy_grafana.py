"""deploy/grafana: the dashboard's structure, its PromQL against the metric names the server really
exports (read from server.metrics' registry), and every panel query evaluated by promtool on series
made from the server's own /metrics exposition."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from deploy_helpers import (
    DASHBOARD,
    GRAFANA,
    MODEL,
    exported_series_names,
    find_tool,
    grafana_to_promql,
    load_yaml,
    metric_families,
    metric_names,
)

DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d=None) -> list[dict]:
    out = []
    for p in (d or dashboard())["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows keep their panels inside
    return out


def queries(d=None) -> list[tuple[dict, dict]]:
    return [(p, t) for p in panels(d) for t in p.get("targets", [])]


def by_title(title: str) -> dict:
    (p,) = [p for p in panels() if p["title"] == title]
    return p


# ---- structure -----------------------------------------------------------------------------------

def test_dashboard_header():
    d = dashboard()
    assert d["schemaVersion"] >= 39
    assert d["uid"] == "esp-serve" and d["title"] == "esp-serve"
    assert d["id"] is None, "provisioned dashboards must not carry a database id"
    assert "__inputs" not in d, "file provisioning does not resolve __inputs; a datasource variable is used"


def test_datasource_variable_and_references():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS_REF, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS_REF, v["name"]
    # The provisioned datasource is the default, so the variable resolves to it.
    (prov,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert prov["type"] == "prometheus" and prov["isDefault"] is True and prov["uid"]


def test_layout():
    ps = panels()
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells = set()
    for p in ps:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    for p, t in queries():
        assert t["refId"] and t["expr"].strip(), p["title"]
    refids = [(p["id"], t["refId"]) for p, t in queries()]
    assert len(refids) == len(set(refids))


def test_required_panels():
    kinds = {p["title"]: p["type"] for p in panels()}
    assert kinds["Acceptance length over time"] == "timeseries"
    assert kinds["Acceptance length distribution"] == "heatmap"
    assert kinds["Forward-call reduction (1 − 1/τ)"] == "timeseries"
    assert kinds["Mean acceptance length (τ)"] == "stat"
    assert kinds["Tokens per second"] == "timeseries"
    assert kinds["Time to first token"] == "timeseries"
    assert kinds["Inter-token latency"] == "timeseries"
    assert kinds["Requests running and waiting"] == "timeseries"
    assert kinds["KV cache usage"] == "timeseries"
    heat = by_title("Acceptance length distribution")
    (t,) = heat["targets"]
    assert t["format"] == "heatmap" and "esp:acceptance_length_bucket" in t["expr"]
    assert heat["options"]["calculate"] is False, "buckets come from Prometheus"
    for title in ("Time to first token", "Inter-token latency"):
        exprs = [t["expr"] for t in by_title(title)["targets"]]
        assert [e.split(",")[0] for e in exprs] == ["histogram_quantile(0.5", "histogram_quantile(0.99"]


# ---- PromQL against the server's metrics ---------------------------------------------------------

def test_every_query_uses_only_exported_metrics():
    exported = exported_series_names()
    assert "esp:tokens_committed_total" in exported  # the registry really was read
    used = set()
    for p, t in queries():
        names = metric_names(t["expr"])
        assert names, f"{p['title']}: no metric in {t['expr']!r}"
        unknown = names - exported
        assert not unknown, f"panel {p['title']!r} uses {sorted(unknown)}, not exported by server/metrics.py"
        used |= names
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
            assert inner, v["name"]
            assert metric_names(inner.group(1)) <= exported, v["name"]
    assert len(used) >= 15


def test_metric_name_scanner():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket'
            '{model_name=~"$model_name", instance=~"a|b"}[$__rate_interval]))) / ignoring(position) '
            'group_left sum without (x) (esp:forward_calls_total offset 5m) > bool 1e-9')
    assert metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "esp:forward_calls_total"}


def test_variables_and_legends_refer_to_real_labels():
    d = dashboard()
    defined = {v["name"] for v in d["templating"]["list"]} | {"__rate_interval", "__interval", "__range"}
    labels = {k for f in metric_families().values() for s in f.samples for k in s.labels} | {"instance", "job"}
    for p, t in queries(d):
        for var in re.findall(r"\$\{?(\w+)", t["expr"]):
            assert var in defined, f"{p['title']}: ${var} is not a dashboard variable"
        for label in re.findall(r"(\w+)=~?\"", t["expr"]):
            assert label in labels, f"{p['title']}: no metric has label {label!r}"
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
            grouped = re.findall(r"\bby\s*\(([^)]*)\)", t["expr"])
            assert any(label in [g.strip() for g in grp.split(",")] for grp in grouped), (
                f"{p['title']}: legend {{{{{label}}}}} but the query does not keep that label")


# ---- evaluation with promtool --------------------------------------------------------------------

def _series_line(name: str, labels: dict[str, str]) -> str:
    body = ",".join(f'{k}={json.dumps(v)}' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def _input_series() -> list[dict]:
    """Two replicas scraping the same exposition; counters grow by their value every minute."""
    out = []
    for fam in metric_families().values():
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            cumulative = fam.type in ("counter", "histogram", "summary")
            for instance in ("a:8000", "b:8000"):
                labels = {**s.labels, "job": "esp-serve", "instance": instance}
                values = f"0+{s.value:g}x30" if cumulative else f"{s.value:g}x30"
                out.append({"series": _series_line(s.name, labels), "values": values})
    return out


def _counter_total(family: str, **match) -> float:
    fam = metric_families()[family]
    return sum(s.value for s in fam.samples if s.name.endswith("_total")
               and all(s.labels.get(k) == v for k, v in match.items()))


def test_every_panel_query_returns_data(tmp_path):
    """promtool evaluates each query (Grafana variables set to "All") on series built from the
    server's real exposition: each must parse and return at least one non-NaN sample."""
    promtool = find_tool("promtool")
    tests = []
    for p, t in queries():
        expr = grafana_to_promql(t["expr"])
        tests.append({"expr": f"count(({expr}) == ({expr})) > bool 0", "eval_time": "10m",
                      "exp_samples": [{"labels": "{}", "value": 1}], "_panel": f"{p['title']} / {t['refId']}"})
    tau = _counter_total("esp:tokens_committed") / _counter_total("esp:forward_calls")
    exact = [
        ("Mean acceptance length (τ)", tau),
        ("Forward-call reduction (1 − 1/τ)", 1 - 1 / tau),
        ("Draft acceptance rate", _counter_total("vllm:spec_decode_num_accepted_tokens")
         / _counter_total("vllm:spec_decode_num_draft_tokens")),
        ("Requests waiting", 2 * 2.0),  # two replicas, 2 each
        ("Generation throughput", 2 * _counter_total("vllm:generation_tokens") / 60),
    ]
    for title, value in exact:
        panel = [p for p in panels() if p["title"] == title and p["type"] == "stat"][0]
        expr = grafana_to_promql(panel["targets"][0]["expr"])
        # promtool compares floats exactly (2.x): compare within 1e-9 in PromQL instead.
        tests.append({"expr": f"abs(({expr}) - {value!r}) < bool 1e-9", "eval_time": "10m",
                      "exp_samples": [{"labels": "{}", "value": 1}], "_panel": f"{title} = {value}"})
    doc = {"evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": _input_series(),
                      "promql_expr_test": [{k: v for k, v in t.items() if k != "_panel"} for t in tests]}]}
    (tmp_path / "dashboard.test.yml").write_text(yaml.safe_dump(doc, sort_keys=False, width=10_000))
    proc = subprocess.run([promtool, "test", "rules", "dashboard.test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        checked = "\n".join(f"  {t['_panel']}: {t['expr']}" for t in tests)
        pytest.fail(f"promtool failed on a dashboard query:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}\n"
                    f"queries checked:\n{checked}")
    assert MODEL in _input_series()[0]["series"]
