"""promtool on the Prometheus config, the rules and their unit tests, and on the server's real
/metrics exposition."""

from __future__ import annotations

import subprocess

from deploy_helpers import DOCKER, REPO, RULES, exposition, find_tool

PROMTOOL_TESTS = REPO / "tests" / "deploy" / "promtool"


def promtool(*args: str, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([find_tool("promtool"), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_compose_prometheus_config():
    proc = promtool("check", "config", str(DOCKER / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_check_catches_mistakes(tmp_path):
    bad = tmp_path / "prometheus.yml"
    bad.write_text((DOCKER / "prometheus.yml").read_text().replace("scrape_interval: 5s", "scrape_interval: 5 s"))
    assert promtool("check", "config", str(bad)).returncode != 0


def test_rules_file():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_unit_tests():
    proc = promtool("test", "rules", "esp-serve-rules.test.yml", cwd=PROMTOOL_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_server_exposition_lints_clean_except_colons():
    """`promtool check metrics` on what /metrics serves. The only finding allowed is the colon in
    the vllm:/esp: names, kept on purpose for compatibility with vLLM dashboards."""
    proc = promtool("check", "metrics", stdin=exposition())
    findings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    other = [ln for ln in findings if not ln.endswith("metric names should not contain ':'")]
    assert other == [], "\n".join(other)
