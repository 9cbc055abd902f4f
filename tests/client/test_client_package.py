"""The client package alone, as a user who only wants `squeeze compress` installs it: `pip install ./client` into a
plain venv (no system site-packages, no checkout on the path) pulls the client's dependencies and nothing of the
server; `squeeze --help` works, `squeeze server` says how to get the server, and one job runs against a live server
through the installed command and the installed Python client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from testing.stack import ROOT
from tests.test_e2e_cli import live_stack_and_files

CLIENT_NEEDS = {"squeeze-client", "httpx", "typer", "rich", "pydantic", "pyyaml"}
SERVER_ONLY = {"squeeze", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "psycopg-binary",
               "celery", "redis", "pydantic-settings", "python-multipart", "boto3", "matplotlib", "torch", "onnx",
               "onnxruntime", "numpy"}
# The installed Python client, as a pipeline uses it: every progress callback sees a stage, every event a message.
SNIPPET = """
import json, sys
from squeeze_client import Client
with Client() as sq:
    model = sq.upload_model(sys.argv[1], reuse=True)
    job = sq.create_job(model.id, "prune-50")
    stages = []
    job = sq.wait(job.id, timeout=300, on_progress=lambda j: stages.append(j.stage))
    messages = [e.message for e in sq.events(job.id)]
    print(json.dumps({"model": model.id, "status": job.status, "stages": stages, "messages": messages}))
"""


def _plain_venv(folder: Path) -> Path:
    """A venv with the client installed from a copy of client/ (the build writes nothing into the checkout)."""
    source = folder / "client-src"
    shutil.copytree(ROOT / "client", source, symlinks=False,  # the webhooks module is a link: its file is copied
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv.create(folder / "venv", with_pip=True, system_site_packages=False)
    python = folder / "venv" / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
                               capture_output=True, text=True, timeout=600, env=_env(folder))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def _env(folder: Path, **extra: str) -> dict[str, str]:
    """No checkout on the path, no developer config, no server settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SQUEEZE_", "PYTHON", "VIRTUAL_ENV")) and k != "PYTHONPATH"}
    return {**env, "XDG_CONFIG_HOME": str(folder / "no-config"), **extra}


def test_client_installs_alone_and_runs_a_job(stack_factory, tmp_path):
    python = _plain_venv(tmp_path)
    squeeze = str(python.parent / "squeeze")
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True, env=_env(tmp_path))
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert CLIENT_NEEDS <= names and not names & SERVER_ONLY, sorted(names)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True, text=True,
                              timeout=300)

    helped = run(squeeze, "--help")
    assert helped.returncode == 0 and "compress" in helped.stdout and "Exit codes" in helped.stdout, helped
    no_server = run(squeeze, "server")
    assert no_server.returncode == 1 and "not installed here" in no_server.stderr, no_server
    assert "pip install -e client -e '.[worker]'" in no_server.stderr

    _, model, data, server = live_stack_and_files(stack_factory, tmp_path, "mlp.pt2", epochs=2)

    # The walk-through's int8 job with an eval set only: the CLI summary says it calibrated on the eval set.
    done = run(squeeze, "compress", str(model), "--recipe", "int8", "--eval", str(data), "--output", "out", **server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"model.onnx", "report.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "│ accuracy" in done.stdout and "-0.00" not in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    notes = [n for step in report["steps"] for n in step.get("notes") or []]
    assert any("calibrated on the 'eval' dataset" in n for n in notes), notes
    unwrapped = "".join(done.stdout.split())  # the summary wraps notes to the terminal's width
    assert all("".join(f"note, steps[0] quantize: {n}".split()) in unwrapped for n in notes), done.stdout

    piped = run(str(python), "-c", SNIPPET, str(model), **server)
    assert piped.returncode == 0, piped.stderr
    result = json.loads(piped.stdout)
    models = json.loads(run(squeeze, "models", "list", "--json", **server).stdout)["data"]
    assert [m["id"] for m in models] == [result["model"]]  # the snippet found the CLI's upload by its sha256
    assert result["status"] == "succeeded" and result["stages"][-1] == "succeeded", result
    assert all(isinstance(s, str) and s for s in result["stages"] + result["messages"]), result  # never None


@pytest.mark.skipif(sys.platform != "linux", reason="the server host is Linux")
def test_server_command_still_runs_from_the_checkout():
    """In the checkout's venv (make install: both packages) the same command reaches the server side."""
    shown = subprocess.run([sys.executable, "-m", "squeeze_client", "server", "--help"], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
    assert shown.returncode == 0 and "--workers" in shown.stdout
    via_app = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
    assert via_app.returncode == 0 and "compress" in via_app.stdout
