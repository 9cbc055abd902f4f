"""Hostile model code through HTTP on a real stack (docs/security.md): a package's model.py attacks, and another
team's job beside it is untouched. tests/worker/test_isolation.py attacks the sandbox process by process."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from testing import modelzoo
from tests.conftest import new_team_key
from testing.stack import wait_for
from tests.test_e2e import FAST_REAPER, digits_files, upload  # noqa: F401 - the fixture is shared
from tests.worker.test_isolation import FORK_LOOP
from worker import uid_slots

PRUNE = {"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}], "outputs": ["package"],
         "evaluate": {"batch_sizes": [1], "repeats": 3}}

# build_model() leaves a double-forked, setsid daemon behind, looks at every process it can see for a while
# (another team's job runs meanwhile) and fails with what it saw.
DAEMON_SOURCE = '''
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "import time; time.sleep(600)", "{marker}"])
    os._exit(0)
os.wait()

def build_model():
    seen = set()
    for _ in range(40):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    seen.add(os.readlink(f"/proc/{{pid}}/cwd"))
                except OSError:
                    seen.add(pid)
        time.sleep(0.25)
    raise RuntimeError(f"SEEN {{len(seen)}} {{sorted(seen)}}")
'''

FLOOD_SOURCE = '''
import gc
channel = next(o for o in gc.get_objects() if type(o).__name__ == "Channel")
{attack}

def build_model():
    raise RuntimeError("the attack did not stop the job")
'''
EVENT_FLOOD = 'for i in range(5000):\n    channel.send({"type": "event", "name": "x", "data": {"pad": "y" * 100_000}})'
HUGE_LINE = 'channel.send({"type": "error", "code": "x", "message": "z" * (8 << 20)})'
LONG_ERROR = 'raise RuntimeError("w" * 100_000)'

FORK_BOMB_SOURCE = FORK_LOOP + '''
time.sleep(20)

def build_model():
    raise RuntimeError(f"forked {n}")
'''


def _package(tmp_path, source: str):
    return modelzoo.write_package(modelzoo.train_mlp(epochs=1), tmp_path / f"{uuid.uuid4().hex}.zip", source)


def _submit(client, model_path, eval_path, recipe=PRUNE) -> str:
    model = upload(client, "models", model_path)
    eval_ds = upload(client, "datasets", eval_path)
    r = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe, "datasets": {"eval": eval_ds["id"]}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_hostile_daemon_sees_no_other_job_and_dies_with_its_own(stack_factory, digits_files, tmp_path):
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=2)
    attacker = stack.client(new_team_key(stack.admin, "attacker"))
    victim = stack.client(new_team_key(stack.admin, "victim"))
    marker = f"squeeze-daemon-{uuid.uuid4().hex}"
    hostile = _submit(attacker, _package(tmp_path, DAEMON_SOURCE.format(marker=marker)), digits_files["eval"])
    wait_for(attacker, hostile, until=lambda job: job["status"] == "running", timeout=120)
    normal = _submit(victim, digits_files["package"], digits_files["eval"])
    job = wait_for(attacker, hostile, timeout=240)
    assert job["status"] == "failed" and "SEEN" in job["error"]["message"], job
    seen = job["error"]["message"].split("SEEN ", 1)[1]
    assert int(seen.split()[0]) <= 3, seen  # bwrap's init, the job, its daemon: nothing of the host
    assert normal not in seen and "victim" not in seen
    assert _host_processes_with(marker) == [], "the daemon outlived its job"
    done = wait_for(victim, normal, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    events = attacker.get(f"/v1/jobs/{hostile}/events").json()["data"]
    sandbox = next(e for e in events if e["type"] == "sandbox")
    assert sandbox["data"]["isolation"]["mode"].startswith("bwrap")
    if os.geteuid() == 0:
        assert uid_slots.processes_of(sandbox["data"]["isolation"]["uid"]) == []


@pytest.mark.parametrize("attack", [EVENT_FLOOD, HUGE_LINE], ids=["event-flood", "huge-line"])
def test_what_a_sandbox_sends_is_capped(stack_factory, digits_files, tmp_path, attack):
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "flood"))
    db = stack.data_dir / "squeeze.db"
    before = sum(p.stat().st_size for p in stack.data_dir.glob("squeeze.db*"))
    job_id = _submit(client, _package(tmp_path, FLOOD_SOURCE.format(attack=attack)), digits_files["eval"])
    job = wait_for(client, job_id, timeout=240)
    assert job["status"] == "failed" and job["error"]["code"] == "sandbox_output_limit", job["error"]
    assert "SQUEEZE_SANDBOX_MAX" in job["error"]["message"]
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert len(events) <= 1010
    grown = sum(p.stat().st_size for p in stack.data_dir.glob("squeeze.db*")) - before
    assert db.exists() and grown < 16 << 20, grown  # 4 MiB of events (the cap) plus the uploads' rows and WAL


def test_a_long_error_message_is_cut_with_a_note(stack_factory, digits_files, tmp_path):
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "verbose"))
    job = wait_for(client, _submit(client, _package(tmp_path, FLOOD_SOURCE.format(attack=LONG_ERROR)),
                                   digits_files["eval"]), timeout=240)
    assert job["status"] == "failed"
    assert len(job["error"]["message"]) < 4200 and "characters cut" in job["error"]["message"], job["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="one uid per job needs a root worker")
def test_two_fork_bombs_do_not_starve_another_team(stack_factory, digits_files, tmp_path):
    stack = stack_factory("sqlite", **FAST_REAPER, SQUEEZE_SANDBOX_MAX_PROCESSES="256")
    stack.start_api()
    stack.start_worker(concurrency=3)
    attacker = stack.client(new_team_key(stack.admin, "bomber"))
    victim = stack.client(new_team_key(stack.admin, "bystander"))
    bomb = _package(tmp_path, FORK_BOMB_SOURCE)
    bombs = [_submit(attacker, bomb, digits_files["eval"]) for _ in range(2)]
    for job_id in bombs:
        wait_for(attacker, job_id, until=lambda job: job["status"] == "running", timeout=120)
    normal = _submit(victim, digits_files["package"], digits_files["eval"])
    done = wait_for(victim, normal, timeout=300)
    assert done["status"] == "succeeded", done["error"]
    for job_id in bombs:
        job = wait_for(attacker, job_id, timeout=240)
        assert job["status"] == "failed" and "forked" in job["error"]["message"], job["error"]
        assert int(job["error"]["message"].rsplit("forked ", 1)[1].split()[0]) < 256


LEFTOVER_SOURCE = '''
import os
seen = [p for p in ("/tmp/left-by-a-job", "/dev/shm/left-by-a-job", "/var/tmp/left-by-a-job") if os.path.exists(p)]
for path in ("/tmp/left-by-a-job", "/dev/shm/left-by-a-job", "/var/tmp/left-by-a-job"):
    open(path, "w").write("a previous job was here")

def build_model():
    raise RuntimeError(f"LEFTOVERS {seen}")
'''


def _warm_ready(stack, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    log = stack.log_dir / "worker0.log"
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count("warm sandbox ready") >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the worker made no warm sandbox number {count}")


def test_warm_sandboxes_serve_one_job_each_and_carry_nothing_across_teams(stack_factory, digits_files, tmp_path):
    stack = stack_factory("sqlite", **FAST_REAPER)  # SQUEEZE_SANDBOX_WARM defaults to 1
    stack.start_api()
    stack.start_worker(concurrency=1)
    package = _package(tmp_path, LEFTOVER_SOURCE)
    seen = []
    for n, team in enumerate(("first-team", "second-team")):
        _warm_ready(stack, n + 1)
        client = stack.client(new_team_key(stack.admin, team))
        job = wait_for(client, _submit(client, package, digits_files["eval"]), timeout=240)
        assert job["status"] == "failed" and "LEFTOVERS" in job["error"]["message"], job["error"]
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        sandbox = next(e for e in events if e["type"] == "sandbox")["data"]["isolation"]
        assert sandbox["warm"] is True
        seen.append((job["error"]["message"].split("LEFTOVERS ", 1)[1].strip(), sandbox["host_pid"]))
    assert seen[0][0] == "[]" and seen[1][0] == "[]", seen  # nothing the first job wrote reached the second
    assert seen[0][1] != seen[1][1]  # two sandbox processes, one job each
