"""The deployment files in deploy/: container image, compose, Kubernetes, systemd.

None of them can run here (no container runtime, no cluster, no systemd as PID 1), so each is
checked for what would break a user's deployment: the compose file's structure and the files it
references, the Kubernetes manifests against the pinned Kubernetes schemas (``make lint`` runs the
same with the CLI), the config they all ship loading and refusing to relay without AUTH, the
ConfigMap staying equal to the files it copies, the systemd units with ``systemd-analyze verify``
where it exists, and the Dockerfile's shape (``make lint`` runs hadolint on it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import load_settings
from engine.shaping.rules import load_shaping, resolve_path

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = re.search(r"^K8S_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)  # type: ignore[union-attr]
ENGINE_SERVICES = ("migrate", "intake", "worker", "dispatcher", "exporter")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def _k8s_docs() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)s", value)
    assert m, value
    return float(m.group(1))


# ---- the config every container deployment uses


def test_container_config_loads_binds_all_interfaces_and_is_no_open_relay() -> None:
    s = load_settings(DEPLOY / "engine.container.toml", env={})
    assert s.http.listen[0] == "0.0.0.0"
    assert s.smtp.listeners and all(lst.listen[0] == "0.0.0.0" for lst in s.smtp.listeners)
    # Every client of a container arrives through NAT: nobody may relay without AUTH.
    assert s.smtp.trusted_networks == []
    assert all(lst.trusted_networks == [] for lst in s.smtp.listeners)
    # Ports above 1024: the image runs as a non-root user without capabilities.
    assert all(lst.listen[1] > 1024 for lst in s.smtp.listeners) and s.http.listen[1] > 1024
    shaping = resolve_path(s)
    assert shaping == DEPLOY / "shaping.toml"
    load_shaping(shaping)


# ---- Dockerfile


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages == ["build", "runtime"], stages
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.M), "the runtime stage must run as the non-root user"
    assert "pip install" in text and "engine-*.whl" in text, "the package is installed from its wheel"
    assert re.search(r'^ENTRYPOINT \["engine"\]$', runtime, re.M)
    health = re.search(r"^HEALTHCHECK .*\n(.*\n)*?\s+CMD (\[.*\])$", runtime, re.M)
    assert health and "/healthz" in health.group(2) and "urllib.request" in health.group(2)
    # Every file the image copies from the build context exists.
    for src in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies {part}, which does not exist"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[lint]'; make lint runs it)")
    out = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_healthcheck_command_runs_against_a_live_engine(tmp_path: Path) -> None:
    """The HEALTHCHECK's python -c: exit 0 against a serving /healthz, non-zero when nothing listens."""
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"CMD (\[\"python\", \"-c\".*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
        env = {"ENGINE_HEALTH_URL": url, "PATH": "/usr/bin:/bin"}
        assert subprocess.run([sys.executable, *cmd[1:]], env=env, timeout=30).returncode == 0
        env["ENGINE_HEALTH_URL"] = url.replace("/healthz", "/nothing")
        assert subprocess.run([sys.executable, *cmd[1:]], env=env, timeout=30, capture_output=True).returncode != 0
    finally:
        server.shutdown()


# ---- compose


def test_compose_services_and_commands() -> None:
    c = _compose()
    services = c["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["intake"]["command"] == ["run", "--workers", "0"]
    assert services["worker"]["command"] == ["worker"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["dispatcher"]["command"] == ["webhooks", "run"] and services["dispatcher"]["profiles"]
    assert services["exporter"]["command"] == ["export", "run"] and services["exporter"]["profiles"]
    # The worker service scales: no fixed name, no published port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert any(str(p).startswith("8025:") for p in services["intake"]["ports"]), "the dashboard/API port"
    for name in ENGINE_SERVICES:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / svc["build"]["context"]).resolve() == REPO
        assert svc["environment"]["DATABASE_URL_FILE"] == "/run/secrets/database_url"
        assert svc["environment"]["ENGINE_SECRET_KEY_FILE"] == "/run/secrets/engine_secret_key"
        if name == "intake":
            assert "healthcheck" not in svc, "the intake keeps the image's /healthz check"
        else:
            assert svc["healthcheck"]["disable"] is True, f"{name} serves no HTTP: the image's check must be off"
    # Engine nodes wait for a healthy Postgres and a finished migration.
    for name in ("intake", "worker", "dispatcher", "exporter"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert "migrate" not in services["migrate"]["depends_on"]


def test_compose_references_are_defined_and_files_exist() -> None:
    c = _compose()
    for name, svc in c["services"].items():
        for secret in svc.get("secrets", []):
            assert secret in c["secrets"], f"{name}: secret {secret} not defined"
        for cfg in svc.get("configs", []):
            assert cfg["source"] in c["configs"], f"{name}: config {cfg['source']} not defined"
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert source in c["volumes"], f"{name}: volume {source} not defined"
    for cfg in c["configs"].values():
        assert (DEPLOY / cfg["file"]).is_file(), cfg["file"]
    # Secret files are made by make-secrets.sh under deploy/secrets/, which git ignores.
    for secret in c["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    assert "deploy/secrets/" in (REPO / ".gitignore").read_text().split()
    assert (DEPLOY / "make-secrets.sh").stat().st_mode & 0o111
    # The config mounted is the container config; stop_grace_period leaves room for its shutdown_timeout.
    mounted = {cfg["target"]: c["configs"][cfg["source"]]["file"] for cfg in c["services"]["intake"]["configs"]}
    assert mounted["/etc/engine/engine.toml"] == "./engine.container.toml"
    settings = load_settings(DEPLOY / "engine.container.toml", env={})
    for name in ENGINE_SERVICES:
        assert _seconds(c["services"][name]["stop_grace_period"]) > settings.server.shutdown_timeout + 5


def test_make_secrets_script(tmp_path: Path) -> None:
    """make-secrets.sh writes a DATABASE_URL with the Postgres password and a valid Fernet key, once."""
    from cryptography.fernet import Fernet

    work = tmp_path / "deploy"
    work.mkdir()
    shutil.copy(DEPLOY / "make-secrets.sh", work)
    assert subprocess.run(["sh", str(work / "make-secrets.sh")], capture_output=True, timeout=60).returncode == 0
    password = (work / "secrets" / "postgres_password").read_text().strip()
    assert len(password) >= 32
    url = (work / "secrets" / "database_url").read_text().strip()
    assert url == f"postgresql://engine:{password}@postgres:5432/engine"
    Fernet((work / "secrets" / "engine_secret_key").read_text().strip().encode())
    s = load_settings(None, env={"DATABASE_URL_FILE": str(work / "secrets" / "database_url"),
                                 "ENGINE_SECRET_KEY_FILE": str(work / "secrets" / "engine_secret_key")})
    assert s.database.url == url
    subprocess.run(["sh", str(work / "make-secrets.sh")], capture_output=True, timeout=60, check=True)
    assert (work / "secrets" / "postgres_password").read_text().strip() == password, "a second run keeps the secrets"


def test_compose_config_with_docker_when_available(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("docker compose is not installed here; the structure is checked by the tests above")
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work, ignore=shutil.ignore_patterns("secrets"))
    subprocess.run(["sh", str(work / "make-secrets.sh")], check=True, capture_output=True, timeout=60)
    out = subprocess.run([docker, "compose", "-f", str(work / "compose.yaml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ---- Kubernetes


def test_k8s_manifests_validate_against_pinned_kubernetes() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the lint extras (make lint runs it too)")
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kv.validate(doc, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):
        bad = _k8s_docs()[("Deployment", "engine-worker")]
        bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 1
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_secrets_and_the_job() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"secret.example.yaml", "migrate-job.yaml"}


def test_k8s_configmap_is_the_container_config_and_shaping_file() -> None:
    cm = _k8s_docs()[("ConfigMap", "engine-config")]
    assert cm["data"]["engine.toml"] == (DEPLOY / "engine.container.toml").read_text(), (
        "deploy/k8s/configmap.yaml must carry deploy/engine.container.toml verbatim")
    assert cm["data"]["shaping.toml"] == (DEPLOY / "shaping.toml").read_text(), (
        "deploy/k8s/configmap.yaml must carry deploy/shaping.toml verbatim")


def test_k8s_deployments_probes_commands_and_termination() -> None:
    docs = _k8s_docs()
    settings = load_settings(DEPLOY / "engine.container.toml", env={})
    intake = docs[("Deployment", "engine-intake")]["spec"]["template"]["spec"]
    worker = docs[("Deployment", "engine-worker")]["spec"]["template"]["spec"]
    (ci,), (cw,) = intake["containers"], worker["containers"]
    assert ci["args"] == ["run", "--workers", "0"] and cw["args"] == ["worker"]
    assert ci["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ci["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in ci["ports"]}
    assert ports["http"] == settings.http.listen[1]
    assert sorted(v for k, v in ports.items() if k != "http") == sorted(lst.listen[1] for lst in settings.smtp.listeners)
    # Graceful termination: the grace period covers preStop plus the engine's own drain.
    pre_stop = int(ci["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert intake["terminationGracePeriodSeconds"] > pre_stop + 2 * settings.server.shutdown_timeout
    assert worker["terminationGracePeriodSeconds"] > settings.server.shutdown_timeout + 5
    for spec, c in ((intake, ci), (worker, cw)):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e for e in c["env"]}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "engine-secrets"
        assert env["ENGINE_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "engine-secrets"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/etc/engine"] == "config" and "/var/lib/engine" in mounts
    svc = docs[("Service", "engine")]
    assert svc["spec"]["selector"] == docs[("Deployment", "engine-intake")]["spec"]["selector"]["matchLabels"]
    for kind_name in (("PodDisruptionBudget", "engine-intake"), ("PodDisruptionBudget", "engine-worker")):
        component = kind_name[1].split("-")[1]
        assert docs[kind_name]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component


def test_k8s_hpa_scales_workers_on_a_metric_the_engine_exports() -> None:
    hpa = _k8s_docs()[("HorizontalPodAutoscaler", "engine-worker")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "engine-worker"
    (metric,) = hpa["metrics"]
    name = metric["external"]["metric"]["name"]
    source = (REPO / "engine" / "api" / "metrics.py").read_text()
    assert f'GaugeMetricFamily("{name}"' in source, f"{name} is not exported at /metrics"
    assert name in (K8S / "hpa.yaml").read_text().split("Prometheus Adapter", 1)[1], "the adapter rule is documented"


# ---- systemd


UNITS = ("engine.service", "engine-worker@.service")
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "User": "engine"}


def _unit(name: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        else:
            key, _, value = line.partition("=")
            sections[current][key] = value
    return sections


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_required_keys(name: str) -> None:
    unit = _unit(name)
    svc = unit["Service"]
    for key, value in HARDENING.items():
        assert svc.get(key) == value, f"{name}: {key}={svc.get(key)}"
    assert svc["ExecStart"].startswith("/opt/engine/bin/engine ")
    assert svc["ExecStart"].split()[1] == ("run" if name == "engine.service" else "worker")
    assert svc["RestartPreventExitStatus"] == "2", "a bad config or a too-new schema must not restart in a loop"
    settings = load_settings(DEPLOY / "engine.example.toml", env={})
    assert float(svc["TimeoutStopSec"]) > settings.server.shutdown_timeout + 5
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if name == "engine.service":
        assert svc["KillMode"] == "mixed", "SIGTERM to the supervisor only: it drains its workers itself"


def test_systemd_units_verify_and_are_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the required keys are checked above")
    engine_bin = Path(sys.executable).parent / "engine"
    paths = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/engine/bin/engine", str(engine_bin))
        path = tmp_path / name.replace("@.", "@1.")  # verify needs an instance of the template
        path.write_text(text)
        paths.append(path)
    out = subprocess.run([analyze, "verify", *map(str, paths)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys: any output at all is a finding.
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    for path in paths:
        out = subprocess.run([analyze, "security", "--offline=true", str(path)], capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout + out.stderr)
        if m is None:
            pytest.skip(f"systemd-analyze security --offline is not supported here: {out.stderr.strip()[:200]}")
        assert float(m.group(1)) <= 2.5, f"{path.name}: exposure {m.group(1)} (systemd rates <= 2.5 as well hardened)"
