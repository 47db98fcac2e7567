"""deploy/kubernetes: the rendered manifests are current, match `kubectl kustomize` where kubectl
exists, pass kubernetes-validate's offline schemas (strict), and hang together (probes, selectors,
ports, GPU limits, autoscaling metric)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from deploy_helpers import K8S, RULES, exported_series_names, import_or_missing, load_yaml, load_yaml_all

spec = importlib.util.spec_from_file_location("esp_k8s_render", K8S / "render.py")
render = importlib.util.module_from_spec(spec)
sys.modules["esp_k8s_render"] = render
spec.loader.exec_module(render)

OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
K8S_VERSION = "1.30"  # the oldest version the manifests must work on


def rendered(variant: str) -> list[dict]:
    return load_yaml_all(K8S / "rendered" / f"{variant}.yaml")


def by_kind(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        assert d["kind"] not in out, f"two {d['kind']} objects"
        out[d["kind"]] = d
    return out


def container(docs) -> dict:
    (c,) = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


# ---- rendering -----------------------------------------------------------------------------------

def test_generated_files_are_current():
    proc = subprocess.run([sys.executable, str(K8S / "render.py"), "--check"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr + "\nrun: python deploy/kubernetes/render.py"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_rendered_file_is_the_renderer_output(variant):
    assert (K8S / "rendered" / f"{variant}.yaml").read_text() == render.render_text(OVERLAYS[variant])


def test_prometheusrule_wraps_the_rules_file():
    pr = load_yaml(K8S / "components" / "prometheus-operator" / "prometheusrule.yaml")
    assert pr["kind"] == "PrometheusRule"
    assert pr["spec"]["groups"] == load_yaml(RULES)["groups"]


def _kubectl():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        # kubectl comes with this project's machine image; no package registry it can reach ships it.
        pytest.skip("kubectl not installed: the cross-check against `kubectl kustomize` needs it")
    return kubectl


def _kustomize(kubectl: str, directory) -> list[dict]:
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_renderer_matches_kubectl_kustomize(variant):
    kubectl = _kubectl()
    assert _kustomize(kubectl, OVERLAYS[variant]) == render.build(OVERLAYS[variant])


def _keda_overlay(tmp_path):
    d = tmp_path / "cpu-keda"
    d.mkdir(parents=True)
    rel = os.path.relpath(K8S, d)  # kustomize refuses absolute paths
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "esp-serve",
        "resources": [f"{rel}/overlays/cpu"], "components": [f"{rel}/components/keda"]}))
    return d


def test_keda_component(tmp_path):
    docs = render.build(_keda_overlay(tmp_path))
    kinds = by_kind(docs)
    assert "HorizontalPodAutoscaler" not in kinds, "KEDA owns the HPA; the base one is removed"
    so = kinds["ScaledObject"]
    assert so["metadata"]["namespace"] == "esp-serve"
    assert so["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "vllm:num_requests_waiting" in query and "vllm:num_requests_waiting" in exported_series_names()
    assert f'namespace="{so["metadata"]["namespace"]}"' in query
    assert float(trigger["metadata"]["threshold"]) > 0
    if shutil.which("kubectl"):
        assert _kustomize(shutil.which("kubectl"), _keda_overlay(tmp_path / "k")) == docs


def test_renderer_rejects_unsupported_kustomize_features(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(render.RenderError, match="configMapGenerator"):
        render.build(tmp_path)


def test_strategic_merge_semantics():
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                            "args": ["--x"], "resources": {"limits": {"cpu": "1"}}}],
            "tolerations": [{"key": "a"}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Z", "value": "3"}, {"name": "Y", "value": "9"}],
                             "args": ["--y"], "resources": {"limits": {"memory": "1Gi"}}}],
             "tolerations": [{"key": "b"}]}
    out = render.strategic_merge(base, patch)
    (c,) = out["containers"]
    assert c["env"] == [{"name": "Z", "value": "3"}, {"name": "Y", "value": "9"}, {"name": "X", "value": "1"}]
    assert c["args"] == ["--y"] and c["resources"] == {"limits": {"cpu": "1", "memory": "1Gi"}}
    assert out["tolerations"] == [{"key": "b"}]
    assert render.strategic_merge({"a": 1, "b": 2}, {"a": None}) == {"b": 2}


# ---- schema validation (offline) -----------------------------------------------------------------

CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_builtin_kinds_pass_kubernetes_validate_strict(variant):
    kv = import_or_missing("kubernetes_validate")
    checked = 0
    for doc in rendered(variant):
        if doc["kind"] in CRD_KINDS:
            continue  # no offline schema: checked structurally below
        kv.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked == 5


def test_kubernetes_validate_rejects_mistakes():
    kv = import_or_missing("kubernetes_validate")
    from kubernetes_validate.utils import ValidationError

    deployment = by_kind(rendered("cpu"))["Deployment"]
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


# ---- consistency ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_and_service_wiring(variant):
    docs = rendered(variant)
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
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
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
    cpu, gpu = container(rendered("cpu")), container(rendered("gpu"))
    assert cpu["image"].endswith(":0.1.0-cpu") and gpu["image"].endswith(":0.1.0-cuda")
    assert cpu["args"][cpu["args"].index("--device") + 1] == "cpu"
    assert gpu["args"][gpu["args"].index("--device") + 1] == "cuda"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gpu_pod = by_kind(rendered("gpu"))["Deployment"]["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert "tolerations" not in by_kind(rendered("cpu"))["Deployment"]["spec"]["template"]["spec"]
    # The base's env survives the GPU patch's additions.
    assert {"ESP_SERVE_API_KEY", "ESP_SERVE_CACHE", "OMP_NUM_THREADS", "TRITON_CACHE_DIR"} <= {
        e["name"] for e in gpu["env"]}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_hpa_scales_on_the_adapter_metric(variant):
    kinds = by_kind(rendered(variant))
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": kinds["Deployment"]["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    adapter = load_yaml(K8S / "prometheus-adapter" / "values.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name
    source = rule["seriesQuery"].split("{")[0].strip("'\"")
    assert source in exported_series_names(), f"{source} is not a metric esp-serve exports"
    assert rule["name"]["matches"] == f"^{source}$"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_prometheusrule_metrics_exist():
    from deploy_helpers import metric_names

    pr = load_yaml(K8S / "components" / "prometheus-operator" / "prometheusrule.yaml")
    recorded = {r["record"] for g in pr["spec"]["groups"] for r in g["rules"] if "record" in r}
    for group in pr["spec"]["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - exported_series_names() - recorded - {"up"}
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"
