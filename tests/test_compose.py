"""Static checks of the Docker set-up (DESIGN.md section 8).

There is no Docker engine in CI, so docker-compose.yml, the Dockerfile and the files they
mount are validated as data: the services exist, Kafka is the release the local launcher
runs, the worker is reachable by Prometheus, and every mounted file is in the repository.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
POM = ROOT / "deploy" / "kafka" / "pom.xml"
SERVICES = ("kafka", "worker", "prometheus", "grafana", "demo")
METRICS_PORT = 9102  # DESIGN.md section 6 default; streams.settings.Settings agrees


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), (
        "docker-compose.yml must be a mapping with a 'services' mapping")
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two compose syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            parts = str(entry).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return out


def _host_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of each bind mount of a file or directory."""
    return {target: (ROOT / source).resolve()
            for source, target in _volumes(service) if source.startswith(("./", "../"))}


def _listeners(spec: str) -> dict[str, str]:
    """``NAME://host:port,...`` -> {NAME: "host:port"}."""
    out = {}
    for item in spec.split(","):
        name, addr = item.strip().split("://", 1)
        out[name] = addr
    return out


def _pom_kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.parse(POM).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)
    assert version, f"{POM} has no <properties><kafka.version>"
    return version.strip()


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "service has no command"
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        word, _, args = line.strip().partition(" ")
        out.append((word.upper(), args.strip()))
    return out


# --- docker-compose.yml ------------------------------------------------------------------

def test_all_services_present(services: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services {missing}"


def test_kafka_image_is_the_launchers_release(services: dict[str, dict[str, Any]]) -> None:
    image = services["kafka"]["image"]
    name, _, tag = image.rpartition(":")
    assert name == "apache/kafka", image
    assert tag == _pom_kafka_version(), (
        f"kafka image {image} is not the release in {POM.relative_to(ROOT)} "
        f"({_pom_kafka_version()})")


def test_kafka_is_single_node_kraft_with_two_listeners(
        services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    # CLUSTER_ID must be a Kafka Uuid: 16 bytes, URL-safe base64 without padding.
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, cluster_id

    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])  # name -> host:port
    bound = _listeners(env["KAFKA_LISTENERS"])
    listener_at = {addr: name for name, addr in advertised.items()}
    assert "kafka:9092" in listener_at, f"no listener advertised as kafka:9092: {advertised}"
    assert "localhost:9092" in listener_at, (
        f"no listener advertised as localhost:9092: {advertised}")
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised

    # The host listener's container port is published on the host's 9092.
    host_listener = listener_at["localhost:9092"]
    container_port = bound[host_listener].rsplit(":", 1)[1]
    published: dict[str, str] = {}  # host port -> container port, from "[ip:]host:container"
    for entry in kafka.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        if len(parts) >= 2:
            published[parts[-2]] = parts[-1]
    assert published.get("9092") == container_port, (
        f"host port 9092 must map to the {host_listener} listener's port {container_port}: "
        f"{kafka.get('ports')}")
    assert kafka.get("healthcheck", {}).get("test"), "kafka needs a healthcheck"


def test_worker_builds_the_repo_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    build = services["worker"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context).resolve() == ROOT, f"worker build context {context!r} is not the repo"
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()


def test_worker_talks_to_the_kafka_service(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    env = _env(worker)
    assert env["DRIFTWARDEN_BROKER"] == "kafka://kafka:9092"
    kafka_advertised = _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert "://kafka:9092" in kafka_advertised
    depends = worker["depends_on"]
    assert isinstance(depends, dict) and depends["kafka"]["condition"] == "service_healthy", (
        "worker must wait for a healthy kafka")


def test_worker_metrics_and_data_dir(compose: dict[str, Any],
                                     services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    env = _env(worker)
    assert env["DRIFTWARDEN_METRICS_HOST"] == "0.0.0.0"
    assert int(env.get("DRIFTWARDEN_METRICS_PORT", METRICS_PORT)) == METRICS_PORT
    exposed = {str(p).split("/")[0] for p in worker.get("expose", [])}
    exposed |= {str(p).rsplit(":", 1)[-1].split("/")[0] for p in worker.get("ports", [])}
    assert str(METRICS_PORT) in exposed, "worker must expose its metrics port"
    data_dir = env["DRIFTWARDEN_DATA_DIR"]
    named = [src for src, target in _volumes(worker) if target == data_dir]
    assert named, f"DRIFTWARDEN_DATA_DIR={data_dir} is not on a volume"
    assert named[0] in (compose.get("volumes") or {}), f"volume {named[0]} is not declared"


def test_every_named_volume_is_declared(compose: dict[str, Any],
                                        services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, _ in _volumes(service):
            if source and not source.startswith(("./", "../", "/")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_every_host_mount_exists(services: dict[str, dict[str, Any]]) -> None:
    mounts = [(name, path) for name, service in services.items()
              for path in _host_mounts(service).values()]
    assert mounts, "expected bind mounts of ./deploy/..."
    for name, path in mounts:
        assert path.is_relative_to(ROOT), f"{name} mounts {path}, outside the repository"
        assert path.exists(), f"{name} mounts {path.relative_to(ROOT)}, which does not exist"


def test_prometheus_scrapes_the_worker(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    mounts = _host_mounts(prometheus)
    config_path = mounts.get("/etc/prometheus/prometheus.yml")
    assert config_path == ROOT / "deploy/prometheus/prometheus.yml", mounts
    config = yaml.safe_load(config_path.read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static.get("targets", []))
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{name}:{dns.get('port')}" for name in dns.get("names", []))
    assert f"worker:{METRICS_PORT}" in targets, f"worker metrics not scraped: {targets}"


def test_grafana_provisions_the_prometheus_datasource(
        services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = _host_mounts(grafana)
    provisioning = mounts.get("/etc/grafana/provisioning")
    assert provisioning == ROOT / "deploy/grafana/provisioning", mounts
    assert "3000" in {str(p).rsplit(":", 1)[-1] for p in grafana.get("ports", [])}
    sources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    [source] = [s for s in sources["datasources"] if s["type"] == "prometheus"]
    assert source["url"] == "http://prometheus:9090"


def test_demo_is_an_optional_simulate_run(services: dict[str, dict[str, Any]]) -> None:
    from streams.cli import _parser

    demo = services["demo"]
    assert demo.get("profiles") == ["demo"]
    for name in SERVICES:
        if name != "demo":
            assert not services[name].get("profiles"), f"{name} must run without a profile"
    command = _command(demo)
    assert command[:4] == ["python", "-m", "streams", "simulate"], command
    try:
        args = _parser().parse_args(command[3:])
    except SystemExit:
        pytest.fail(f"`python -m streams simulate` rejects the demo's flags: {command[4:]}")
    assert args.n > 0
    assert _env(demo)["DRIFTWARDEN_BROKER"] == "kafka://kafka:9092"


def test_no_image_floats(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"{name}: image {image} has no tag"
        assert last.split(":", 1)[1] != "latest", f"{name}: image {image} uses latest"


# --- Dockerfile / .dockerignore ----------------------------------------------------------

def test_dockerfile_runs_the_worker_as_non_root() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim", froms
    cmds = [args for word, args in instructions if word == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    cmd = cmds[-1]
    argv = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert argv[:4] == ["python", "-m", "streams", "worker"], argv
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    env_text = " ".join(args for word, args in instructions if word == "ENV")
    assert "DRIFTWARDEN_METRICS_HOST=0.0.0.0" in env_text
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert re.search(r"pip install .*\.(\s|$)", runs), "the image must `pip install .`"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    for entry in (".venv", ".local", ".git"):
        assert entry in patterns, f".dockerignore must exclude {entry}"
    assert patterns & {"**/__pycache__", "__pycache__"}, ".dockerignore must exclude caches"
