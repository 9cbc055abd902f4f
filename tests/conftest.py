"""Fixtures on the real services: SQLite + filesystem broker, and PostgreSQL + Redis.

PostgreSQL and Redis are required when SQUEEZE_TEST_REQUIRE_SERVICES=1 (as in .ci/run): then a
missing service fails the run instead of skipping the PostgreSQL half of the suite.
"""

from __future__ import annotations

import os

import pytest

from testing.stack import ADMIN_KEY, ROOT, SETTINGS_ENV, Backend, ServiceUnavailable, Stack, backend_env, reset_caches
from testing.stack import make_backend as _make_backend

__all__ = ["ADMIN_KEY", "ROOT", "new_team_key"]
REQUIRE_SERVICES = os.environ.get("SQUEEZE_TEST_REQUIRE_SERVICES") == "1"


def make_backend(name, data_dir) -> Backend:
    try:
        return _make_backend(name, data_dir)
    except ServiceUnavailable as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"{exc} (required: SQUEEZE_TEST_REQUIRE_SERVICES=1)")
        pytest.skip(str(exc))


@pytest.fixture(params=["sqlite", "postgres"])
def backend_name(request) -> str:
    return request.param


@pytest.fixture
def configured(backend_name, tmp_path, monkeypatch):
    """Settings of this process pointed at a fresh database and broker, migrated to head."""
    data_dir = tmp_path / "data"
    backend = make_backend(backend_name, data_dir)
    for k in SETTINGS_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in backend_env(backend, data_dir).items():
        monkeypatch.setenv(k, v)
    reset_caches()
    from app.cli import migrate

    migrate()
    yield backend
    from app.core import db

    db.get_engine().dispose()
    reset_caches()
    for fn in backend.cleanup:
        fn()


@pytest.fixture
def api(configured):
    """An in-process client of the real app on the real database (no worker)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        yield client


def new_team_key(client, team: str) -> str:
    r = client.post("/v1/keys", json={"team": team, "name": "t"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


# The fast lane (`make test-fast`, under 3 minutes) leaves out what starts real servers, workers, sandboxes or
# browsers, the engine suites that train or quantize real models, the API fuzz campaign and the PostgreSQL half
# of the in-process tests (the SQLite half runs); `make test` (CI) runs everything.
SLOW_FIXTURES = {"stack_factory"}
SLOW_MODULES = {"test_isolation.py", "test_cgroups.py", "test_dashboard.py", "test_api_docs.py", "test_fuzz.py",
                "test_client_package.py", "test_readme_quickstart.py", "test_walkthrough.py", "test_server_command.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real services, sandboxes or browsers (not in make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (path.name in SLOW_MODULES or path.name.startswith("test_e2e") or "engine" in path.parts
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or params.get("backend_name") == "postgres"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, for fixtures that add diagnostics to a failure."""
    report = (yield).get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def stack_factory(tmp_path, request):
    """Builds Stacks on a backend; stops them and drops their databases at the end. When the test failed, prints
    each stack's process states and log tails (in the test's captured teardown output)."""
    made: list[Stack] = []

    def make(backend_name: str, **settings: str) -> Stack:
        data_dir = tmp_path / f"data-{len(made)}"
        data_dir.mkdir()
        stack = Stack(make_backend(backend_name, data_dir), data_dir, tmp_path, **settings)
        made.append(stack)
        return stack

    yield make
    call = getattr(request.node, "report_call", None)
    for stack in made:
        if call is not None and call.failed:
            print(stack.diagnostics())
        stack.stop()
