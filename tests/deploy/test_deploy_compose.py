"""docker/docker-compose*.yml: the compose-spec JSON schema (vendored, offline), then what the
schema cannot see: the merged GPU variant, mounted paths, ports, health and the wiring between
esp-serve, Prometheus and Grafana."""

from __future__ import annotations

import copy
import json
import re

import pytest

from deploy_helpers import DOCKER, GRAFANA, REPO, import_or_missing, load_yaml

SCHEMA = REPO / "tests" / "deploy" / "schemas" / "compose-spec.json"
BASE = DOCKER / "docker-compose.yml"
GPU = DOCKER / "docker-compose.gpu.yml"


def validator():
    jsonschema = import_or_missing("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(doc)]


@pytest.mark.parametrize("path", [BASE, GPU], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(path):
    assert schema_errors(load_yaml(path)) == []


def test_schema_rejects_mistakes():
    """The vendored schema is strict enough to catch typical slips."""
    doc = load_yaml(BASE)
    typo = copy.deepcopy(doc)
    typo["services"]["esp-serve"]["healtcheck"] = typo["services"]["esp-serve"].pop("healthcheck")
    assert schema_errors(typo)
    bad_ports = copy.deepcopy(doc)
    bad_ports["services"]["grafana"]["ports"] = {"3000": 3000}
    assert schema_errors(bad_ports)
    bad_device = copy.deepcopy(load_yaml(GPU))
    device = bad_device["services"]["esp-serve"]["deploy"]["resources"]["reservations"]["devices"][0]
    device["capability"] = device.pop("capabilities")
    assert schema_errors(bad_device)


def merge(base, override):
    """Compose's merge of an override file: mappings merge key by key; sequences such as
    `command` and scalars are replaced (docker compose docs, "Merge Compose files")."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return override


def merged_gpu():
    return merge(load_yaml(BASE), load_yaml(GPU))


def test_stack_has_server_prometheus_grafana():
    doc = load_yaml(BASE)
    assert set(doc["services"]) == {"esp-serve", "prometheus", "grafana"}
    for svc in doc["services"].values():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]), "images are tagged (no implicit latest)"
        assert not svc["image"].endswith(":latest")


def _cmd_flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_esp_serve_service(variant):
    doc = load_yaml(BASE) if variant == "cpu" else merged_gpu()
    svc = doc["services"]["esp-serve"]
    build = svc["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file() and dockerfile.name == f"Dockerfile.{'cpu' if variant == 'cpu' else 'cuda'}"
    cmd = svc["command"]
    assert _cmd_flag(cmd, "--model") == "smollm2-135m-instruct"
    assert _cmd_flag(cmd, "--host") == "0.0.0.0"
    assert _cmd_flag(cmd, "--device") == ("cpu" if variant == "cpu" else "cuda")
    port = _cmd_flag(cmd, "--port")
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])
    assert "/var/cache/esp-serve" in [v.split(":")[1] for v in svc["volumes"]]
    assert svc["volumes"][0].split(":")[0] in doc["volumes"], "the model cache is a named volume"
    hc = svc["healthcheck"]
    assert hc["test"][:1] == ["CMD"] and "esp-healthcheck" in " ".join(hc["test"])
    # No secret in the file: the API key only comes from the caller's environment.
    assert svc["environment"]["ESP_SERVE_API_KEY"] == "${ESP_SERVE_API_KEY:-}"
    if variant == "gpu":
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert svc["image"].endswith("-cuda")
        assert int(hc["start_period"].rstrip("s")) >= 300
        assert hc["test"] == load_yaml(BASE)["services"]["esp-serve"]["healthcheck"]["test"]


def _mounts(svc) -> dict[str, str]:
    """container path -> host path (relative to docker/) for bind mounts."""
    out = {}
    for v in svc["volumes"]:
        parts = v.split(":")
        if parts[0].startswith("."):
            out[parts[1]] = parts[0]
    return out


def test_prometheus_mounts_config_and_rules():
    svc = load_yaml(BASE)["services"]["prometheus"]
    mounts = _mounts(svc)
    config_flag = next(a for a in svc["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert (DOCKER / mounts[config_path]).resolve() == DOCKER / "prometheus.yml"
    config = load_yaml(DOCKER / "prometheus.yml")
    # The rule_files glob lands on the mounted deploy/prometheus folder, which holds the rules.
    (pattern,) = config["rule_files"]
    folder, _, glob = pattern.rpartition("/")
    host = (DOCKER / mounts[folder]).resolve()
    assert sorted(p.name for p in host.glob(glob)) == ["esp-serve-rules.yml"]
    # It scrapes esp-serve by its compose service name and container port.
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "esp-serve")
    port = _cmd_flag(load_yaml(BASE)["services"]["esp-serve"]["command"], "--port")
    assert job["static_configs"][0]["targets"] == [f"esp-serve:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned_from_deploy_grafana():
    doc = load_yaml(BASE)
    svc = doc["services"]["grafana"]
    mounts = _mounts(svc)
    prov = (DOCKER / mounts["/etc/grafana/provisioning"]).resolve()
    assert prov == GRAFANA / "provisioning"
    ds = load_yaml(prov / "datasources" / "prometheus.yml")["datasources"][0]
    prom_port = load_yaml(BASE)["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert ds["type"] == "prometheus" and ds["url"] == f"http://prometheus:{prom_port}"
    scrape = load_yaml(DOCKER / "prometheus.yml")["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs Grafana to know the scrape interval"
    provider = load_yaml(prov / "dashboards" / "esp-serve.yml")["providers"][0]
    dash_dir = provider["options"]["path"]
    host_dash = (DOCKER / mounts[dash_dir]).resolve()
    assert (host_dash / "esp-serve.json").is_file()
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/esp-serve.json"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in svc["environment"], "no password in the repository"


def test_bind_mounts_exist_and_are_read_only():
    doc = load_yaml(BASE)
    for name, svc in doc["services"].items():
        for v in svc.get("volumes", []):
            parts = v.split(":")
            if parts[0].startswith("."):
                assert (DOCKER / parts[0]).exists(), f"{name}: {parts[0]} missing"
                assert parts[-1] == "ro", f"{name}: bind mount {v} should be read-only"
            else:
                assert parts[0] in doc["volumes"], f"{name}: named volume {parts[0]} not declared"


def test_depends_on_services_exist():
    doc = load_yaml(BASE)
    for name, svc in doc["services"].items():
        for dep in svc.get("depends_on", {}):
            assert dep in doc["services"], f"{name} depends on unknown {dep}"
