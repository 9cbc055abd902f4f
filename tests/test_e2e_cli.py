"""The `squeeze` command over HTTP against a real API server and worker, as a pipeline or an engineer runs it:
the live progress bar in a terminal, the results table, the artifacts, and the exit codes a pipeline acts on."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from testing import modelzoo
from tests.conftest import new_team_key
from testing.stack import ROOT, free_port
from tests.test_e2e import FAST_REAPER

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
STAGES = ("load", "evaluate_original", "steps", "write", "evaluate_result", "report")


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUEEZE_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "no-config"), **extra)  # the developer's own config stays out
    return env


def squeeze(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeeze_client", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def squeeze_in_terminal(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[int, str]:
    """Runs the command with a pseudo-terminal (160x40) as stdin/stdout/stderr, as in an engineer's shell;
    (exit code, everything it drew)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "squeeze_client", *args], env={**env, "TERM": "xterm-256color"},
                            cwd=ROOT, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the child has closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise TimeoutError(f"squeeze {' '.join(args)} still running after {timeout}s:\n"
                               f"{out.decode(errors='replace')}")
    finally:
        os.close(leader)
    return proc.wait(timeout=30), out.decode(errors="replace")


def live_stack_and_files(stack_factory, tmp_path: Path, model_name: str, epochs: int):
    """A live API and worker, a trained MLP exported to `model_name` and its eval set: (stack, model, eval, server
    settings for a new team's key)."""
    _, _, x_test, y_test = modelzoo.digits_split()
    model_path = modelzoo.export_pt2(modelzoo.train_mlp(epochs=epochs), x_test, tmp_path / model_name)
    eval_path = modelzoo.write_npz(tmp_path / "eval.npz", x_test, y_test)
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    server = {"SQUEEZE_URL": stack.url, "SQUEEZE_API_KEY": new_team_key(stack.admin, "cli")}
    return stack, model_path, eval_path, server


def test_cli_compress_live_progress_results_artifacts_and_exit_codes(stack_factory, tmp_path):
    stack, model_path, eval_path, server = live_stack_and_files(stack_factory, tmp_path, "tests-made-model.pt2", 5)
    env = cli_env(tmp_path, **server)

    # An engineer in a terminal: the file is uploaded, a live bar follows the stages, then the table and files.
    out_dir = tmp_path / "out"
    code, drawn = squeeze_in_terminal(env, "compress", str(model_path), "--recipe", "prune-50",
                                      "--eval", str(eval_path), "--wait", "--output", str(out_dir))
    text = ANSI.sub("", drawn)
    assert code == 0, text
    assert "\x1b[" in drawn  # rich drew for a terminal
    assert "━" in text and re.search(r"\d+%", text) and "100%" in text, text  # the bar, its percentage
    assert any(stage in text for stage in STAGES), text  # a stage name on the bar while it ran
    assert "ETA" in text
    for row in ("size", "MACs", "latency", "accuracy", "agreement"):
        assert re.search(rf"│ {row}", text), (row, text)
    assert re.search(r"uploaded tests-made-model\.pt2 .* as mdl_", text)
    assert {"model.pt2", "report.json"} <= {p.name for p in out_dir.iterdir()}
    report = json.loads((out_dir / "report.json").read_text())
    assert report["metrics"]["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "-0.00" not in text
    for flag in report["metrics"]["flags"]:  # each of the report's flags, with its one-line reason
        assert re.search(rf"\n\s*{flag}: \w", text), (flag, text)

    # A pipeline: ids from --json, then the outcomes it branches on.
    models = json.loads(squeeze(env, "models", "list", "--json").stdout)["data"]
    assert [m["name"] for m in models] == ["tests-made-model.pt2"]
    model_id = models[0]["id"]
    jobs = json.loads(squeeze(env, "jobs", "list", "--status", "succeeded", "--json").stdout)["data"]
    assert len(jobs) == 1 and jobs[0]["model_id"] == model_id
    logs = squeeze(env, "jobs", "logs", jobs[0]["id"], "--follow")
    assert logs.returncode == 0 and "started" in logs.stdout and "succeeded" in logs.stdout, logs
    from squeeze_client import Client

    with Client(stack.url, env["SQUEEZE_API_KEY"]) as sq:  # the Python client over real HTTP (SSE through uvicorn)
        events = list(sq.stream_events(jobs[0]["id"]))
        assert events[0].type == "queued" and events[-1].type == "succeeded"
        paths = sq.download_artifacts(sq.wait(jobs[0]["id"], timeout=10), tmp_path / "py")
        assert [p.read_bytes() for p in paths if p.name == "model.pt2"] == [(out_dir / "model.pt2").read_bytes()]
    dataset_id = json.loads(squeeze(env, "datasets", "upload", str(eval_path), "--json").stdout)["id"]

    unmeetable = tmp_path / "guarded.yaml"
    unmeetable.write_text("steps:\n  - {type: prune, sparsity: 0.5}\nguard: {min_size_ratio: 1000}\n")
    guarded = squeeze(env, "compress", model_id, "--recipe", str(unmeetable), "--eval", dataset_id,
                      "--output", str(tmp_path / "guarded"))  # not a terminal: a line per stage, as in a CI log
    assert guarded.returncode == 6, guarded
    assert re.search(r"job_\w+ running (load|evaluate_original|steps|write|evaluate_result|report) ", guarded.stderr)
    assert "guard_failed: the result misses its guard: min_size_ratio 1000.0" in guarded.stderr
    assert re.search(r"min_size_ratio +│ +limit 1000.0 .*missed", guarded.stdout), guarded.stdout
    assert {"model.pt2", "report.json"} <= {p.name for p in (tmp_path / "guarded").iterdir()}
    job_id = re.search(r"job (job_\w+) queued", guarded.stderr).group(1)
    job = json.loads(squeeze(env, "jobs", "show", job_id, "--json").stdout)
    assert job["status"] == "failed" and job["error"]["code"] == "guard_failed"
    assert not job["metrics"]["guard"]["passed"]
    assert {a["label"] for a in job["artifacts"]} == {"guard_failed"}

    queued = squeeze(env, "compress", model_id, "--recipe", "prune-50", "--no-wait", "--json")
    assert queued.returncode == 0 and queued.stderr == "", queued
    job_id = json.loads(queued.stdout)["id"]
    assert squeeze(env, "jobs", "cancel", job_id).returncode == 0
    assert squeeze(env, "jobs", "logs", job_id, "--follow").returncode == 7  # canceled: the pipeline sees it

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": [{"type": "prune", "sparsity": 1.5}]}))
    refused = squeeze(env, "compress", model_id, "--recipe", str(bad))
    assert refused.returncode == 3 and "recipe.steps[0].sparsity" in refused.stderr, refused
    assert refused.stdout == ""
    uploads_once_and_checks_the_recipe_first(env, tmp_path, model_path, eval_path, bad)
    validated = squeeze(env, "recipes", "validate", str(bad))
    assert validated.returncode == 3 and "steps[0].sparsity" in validated.stderr
    assert squeeze(env, "recipes", "validate", "prune-50").returncode == 0
    assert squeeze(env, "compress", str(tmp_path / "missing.pt2"), "--recipe", "prune-50").returncode == 2
    assert squeeze(env, "jobs", "show", "job_nope").returncode == 3

    wrong_key = squeeze(env, "--api-key", "sqz_wrong", "models", "list")
    assert wrong_key.returncode == 4 and "unauthorized" in wrong_key.stderr
    unreachable = squeeze(env, "--url", f"http://127.0.0.1:{free_port()}", "models", "list")
    assert unreachable.returncode == 9 and "cannot reach" in unreachable.stderr


def _names(env: dict[str, str], kind: str) -> list[str]:
    return [row["name"] for row in json.loads(squeeze(env, kind, "list", "--json").stdout)["data"]]


def uploads_once_and_checks_the_recipe_first(env: dict[str, str], tmp_path: Path, model_path: Path, eval_path: Path,
                                             bad_recipe: Path) -> None:
    """A file the team has is not sent again; a file given for two roles is sent once; a bad recipe is refused
    before anything is uploaded; the job list fits 80 columns."""
    models, datasets = _names(env, "models"), _names(env, "datasets")
    fresh = modelzoo.write_npz(tmp_path / "calib.npz", *modelzoo.digits_split()[:2])  # bytes the server has not seen
    again = squeeze(env, "compress", str(model_path), "--recipe", "prune-50", "--eval", str(eval_path),
                    "--calibration", str(fresh), "--train", str(fresh), "--no-wait")
    assert again.returncode == 0, again
    assert re.search(r"tests-made-model\.pt2: already uploaded as mdl_\w+ .*not sent again", again.stderr), again
    assert re.search(r"eval\.npz: already uploaded as ds_", again.stderr), again
    assert again.stderr.count("uploaded calib.npz") == 1, again  # calibration and train: one upload
    assert _names(env, "models") == models and sorted(_names(env, "datasets")) == sorted([*datasets, "calib.npz"])
    job = json.loads(squeeze(env, "jobs", "show", again.stdout.strip(), "--json").stdout)
    assert job["datasets"]["calibration"] == job["datasets"]["train"] != job["datasets"]["eval"]
    squeeze(env, "jobs", "cancel", job["id"])

    new_model = tmp_path / "never-sent.pt2"
    new_model.write_bytes(model_path.read_bytes() + b"\0")  # other bytes: it would be uploaded
    refused = squeeze(env, "compress", str(new_model), "--recipe", str(bad_recipe), "--eval", str(fresh))
    assert refused.returncode == 3 and "recipe.steps[0].sparsity" in refused.stderr, refused
    assert "nothing was uploaded" in refused.stderr and _names(env, "models") == models

    listed = squeeze({**env, "COLUMNS": "80"}, "jobs", "list")
    rows = [line for line in listed.stdout.splitlines() if line.strip().startswith("job_")]
    assert len(rows) == 4 and max(len(line) for line in listed.stdout.splitlines()) <= 80, listed.stdout
    assert all(re.match(r"\s*job_[0-9a-f]{24}\s+(succeeded|failed|canceled|canceling|queued)", r) for r in rows), rows
