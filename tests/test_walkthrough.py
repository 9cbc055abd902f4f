"""examples/walkthrough.sh (the curl walk-through of docs/api.md) run as written against a real API server and
worker: it must finish, and the model it downloads must be the job's artifact, pruned."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import torch

from testing.stack import ADMIN_KEY, ROOT
from tests.test_e2e import FAST_REAPER

SCRIPT = ROOT / "examples" / "walkthrough.sh"


def run_walkthrough(url: str, cwd, out) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUEEZE_")}
    env.update(URL=url, ADMIN=ADMIN_KEY, OUT=str(out))
    return subprocess.run(["bash", str(SCRIPT)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def zero_fraction_of_weights(path) -> float:
    program = torch.export.load(str(path))
    weights = [t for name, t in program.state_dict.items() if name.endswith("weight") and t.ndim == 2]
    assert weights, list(program.state_dict)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_walkthrough_script_runs_and_downloads_the_pruned_artifact(stack_factory, tmp_path):
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    out = tmp_path / "out"

    done = run_walkthrough(stack.url, tmp_path, out)

    assert done.returncode == 0, done.stdout + done.stderr
    ids = dict(re.findall(r"(KEY|MODEL|EVAL|JOB)=(\S+)", done.stdout.splitlines()[-1]))
    assert set(ids) == {"KEY", "MODEL", "EVAL", "JOB"}, done.stdout
    job = stack.client(ids["KEY"]).get(f"/v1/jobs/{ids['JOB']}").json()
    assert job["status"] == "succeeded" and job["model_id"] == ids["MODEL"]
    assert job["datasets"]["eval"] == ids["EVAL"]
    artifact = {a["name"]: a for a in job["artifacts"]}["model.pt2"]
    downloaded = out / "pruned.pt2"
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == artifact["sha256"]
    assert abs(zero_fraction_of_weights(downloaded) - 0.5) < 0.01
    assert zero_fraction_of_weights(ROOT / "examples" / "mlp.pt2") < 0.01
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["compressed"]["accuracy"] is not None
    events = json.loads((out / "events.json").read_text())
    assert events["data"], events
