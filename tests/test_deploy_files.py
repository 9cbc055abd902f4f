"""Deployment files, checked offline: no Docker engine here (bench/RESULTS.md), so lint and schema-check them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN} (pip install '.[test]')")
    return path


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_compose_matches_the_compose_spec():
    proc = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_passes_hadolint():
    proc = _run(_tool("hadolint"), DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


WORKERS = ("worker-gpu", "worker-cpu")
CORE = ("postgres", "redis", "minio", "migrate", "api", *WORKERS)


def test_compose_services(compose):
    services = compose["services"]
    assert set(CORE) | {"flower"} == services.keys()
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["flower"]["profiles"] == ["monitoring"]
    for name in CORE:
        assert "profiles" not in services[name], f"{name} must start by default"
    assert services["api"]["deploy"]["replicas"] == 2


def test_compose_start_order(compose):
    services = compose["services"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", *WORKERS):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_healthchecks(compose):
    services = compose["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert "ready" in services["minio"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in WORKERS:
        assert "inspect ping" in " ".join(services[name]["healthcheck"]["test"])


def test_compose_environment(compose):
    services = compose["services"]
    for name in ("migrate", "api", *WORKERS):
        env = services[name]["environment"]
        assert env["SQUEEZE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SQUEEZE_BROKER_URL"] == "redis://redis:6379/0"
        assert env["SQUEEZE_BLOB_URL"].startswith("s3://")
        assert env["SQUEEZE_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["SQUEEZE_QUEUE_GPU"] == "gpu"
        assert env["SQUEEZE_BOOTSTRAP_ADMIN_KEY"].startswith("${SQUEEZE_BOOTSTRAP_ADMIN_KEY:?")
    # Blobs are in the bucket: no volume is shared between the API and the workers.
    assert "volumes" not in services["api"]
    for name in WORKERS:
        assert all(":" not in v for v in services[name]["volumes"]), "a worker's scratch volume must be its own"
    assert services["api"]["ports"] == ["8000-8001:8000"]


def test_compose_workers(compose):
    services = compose["services"]
    assert compose["services"]["api"]["build"]["target"] == "api"
    for name, queue in (("worker-gpu", "gpu"), ("worker-cpu", "cpu")):
        worker = services[name]
        assert worker["build"]["target"] == "worker"
        assert f"-Q {queue} " in " ".join(worker["command"])
        assert "SYS_ADMIN" in worker["cap_add"]
        assert "privileged" not in worker
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert "deploy" not in services["worker-cpu"]


def _stages(text: str) -> dict[str, str]:
    """Dockerfile text of each named stage."""
    parts = re.split(r"(?im)^FROM\s+", text)[1:]
    stages = {}
    for part in parts:
        header = part.splitlines()[0]
        m = re.search(r"(?i)\bAS\s+(\S+)", header)
        stages[m.group(1) if m else header] = part
    return stages


def test_dockerfile_roles():
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert {"api", "worker"} <= stages.keys()
    assert "python:3.11-slim" in text
    api_chain = stages["api"] + stages["api-build"] + stages["base"]
    assert "[worker]" not in api_chain and "torch" not in api_chain.replace("no torch", "")
    assert "--from=api-build" in stages["api"]
    assert "--from=worker-build" in stages["worker"]
    assert re.search(r"torch==2\.13\.0", stages["worker-build"])
    assert "[worker]" in stages["worker-build"]
    assert re.search(r'(?m)^USER\s+(?!root|0\b)\S+', stages["api"]), "the API must not run as root"
    assert "HEALTHCHECK" in stages["api"] and "/healthz" in stages["api"]
    assert '"--factory", "app.main:create_app"' in stages["api"]
    assert "celery -A worker.celery_app worker -Q cpu,gpu --loglevel INFO" in stages["worker"]
