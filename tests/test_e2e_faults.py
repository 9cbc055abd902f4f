"""Faults on a real stack (API server, Celery workers, PostgreSQL, Redis, a disk): each test breaks one thing for
real and checks that no job is lost or run twice and that every client gets a clear answer meanwhile.

- a worker's whole process tree kill -9'd in the middle of a batch, then restarted;
- Redis killed with 20 queued jobs and restarted empty;
- PostgreSQL stopped (immediate) and started again under clients uploading, submitting and polling;
- the blob store's disk (and the upload temp dir) full: uploads and artifact writes.

Redis and PostgreSQL here are private servers the tests start on free ports: the shared ones on 6379 and 5432 are
never stopped. Sandbox memory and time limits are tested in tests/test_e2e.py.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from testing import modelzoo
from tests.conftest import REQUIRE_SERVICES, new_team_key
from testing.stack import PrivatePostgres, PrivateRedis, ServiceUnavailable, Stack, make_backend, wait_for

# A 4 s heartbeat timeout (tests/test_e2e.py's FAST_REAPER) requeues live jobs when 20 of them load two cores;
# 10 s does not, and still reaps a killed worker's jobs within a test's patience.
# One team runs the whole load here: no per-team running or upload-rate limit (the defaults are 2 and 30 a minute).
REAPER = {"SQUEEZE_HEARTBEAT_INTERVAL_S": "0.5", "SQUEEZE_HEARTBEAT_TIMEOUT_S": "10",
          "SQUEEZE_REAPER_INTERVAL_S": "1", "SQUEEZE_REQUEUE_AFTER_S": "10", "SQUEEZE_SANDBOX_THREADS": "1",
          "SQUEEZE_TEAM_MAX_RUNNING": "0", "SQUEEZE_TEAM_UPLOADS_PER_MINUTE": "0"}
# The cheapest real job: a package in, a package out, one timed run, no dataset.
LEAN_RECIPE = {"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}], "outputs": ["package"],
               "evaluate": {"batch_sizes": [1], "repeats": 1, "warmup": 0}}
BATCH = 20


def _require(make):
    try:
        return make()
    except ServiceUnavailable as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"{exc} (required: SQUEEZE_TEST_REQUIRE_SERVICES=1)")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def mlp_package(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    x_test = modelzoo.digits_split()[2]
    # Example inputs in the package: no eval dataset needed to know the input shape.
    return modelzoo.write_package(modelzoo.train_mlp(epochs=5), d / "mlp.zip", modelzoo.MLP_SOURCE,
                                  example_inputs=[x_test[:2]])


@pytest.fixture
def private_redis(tmp_path):
    redis = PrivateRedis(tmp_path)
    _require(redis.start)
    yield redis
    redis.kill()


@pytest.fixture
def private_pg():
    pg = _require(PrivatePostgres)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def stacks(tmp_path):
    """Builds Stacks (any backend, any settings); stops them, and drops their databases, at the end."""
    made: list[Stack] = []

    def make(backend_name: str, data_dir: Path | None = None, **kw) -> tuple[Stack, dict]:
        settings = kw.pop("settings", {})
        data_dir = data_dir or tmp_path / f"data-{len(made)}"
        data_dir.mkdir(exist_ok=True)
        stack = Stack(_require(lambda: make_backend(backend_name, data_dir, **kw)), data_dir, tmp_path, **settings)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.stop()


def upload(client: httpx.Client, kind: str, path: Path) -> dict:
    r = client.post(f"/v1/{kind}", params={"name": path.name}, content=path.read_bytes())
    assert r.status_code == 201, r.text
    return r.json()


def submit(client: httpx.Client, model_id: str) -> str:
    r = client.post("/v1/jobs", json={"model_id": model_id, "recipe": LEAN_RECIPE})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def sandboxes() -> dict[str, list[psutil.Process]]:
    """Running sandbox processes by job id (their command line names the job directory `<job id>-<attempt>`)."""
    found: dict[str, list[psutil.Process]] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "worker.sandbox" in cmd and cmd[-1:]:
            job_id = Path(cmd[-1]).name.rsplit("-", 1)[0]
            found.setdefault(job_id, []).append(p)
    return found


def wait_all(client: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    for job_id in ids:
        jobs[job_id] = wait_for(client, job_id, timeout=max(1.0, deadline - time.monotonic()), interval=0.5)
    return jobs


def events(client: httpx.Client, job_id: str) -> list[str]:
    r = client.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 200, r.text
    return [e["type"] for e in r.json()["data"]]


def assert_ran_once(client: httpx.Client, jobs: dict[str, dict]) -> None:
    """Every job succeeded with one set of artifacts, one `succeeded` event and one `started` per attempt."""
    names = None
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", (job_id, job["error"])
        got = [a["name"] for a in job["artifacts"]]
        assert len(got) == len(set(got)), (job_id, got)
        names = names or sorted(got)
        assert sorted(got) == names, (job_id, got, names)  # the same set of artifacts for the same recipe
        types = events(client, job_id)
        assert types.count("succeeded") == 1 and types.count("started") == job["attempts"], (job_id, types)
        assert types.count("requeued") == job["attempts"] - 1, (job_id, types)


def reaper_counts(log: Path) -> dict[str, int]:
    """Totals of the reapers' sweeps in one process's JSON log lines (`reaper: {...}`)."""
    totals = {"requeued": 0, "failed": 0, "canceled": 0, "resent": 0}
    for line in log.read_text(errors="replace").splitlines():
        try:
            msg = json.loads(line).get("message", "")
        except ValueError:
            continue
        if msg.startswith("reaper: {"):
            for k, v in ast.literal_eval(msg[len("reaper: "):]).items():
                totals[k] = totals.get(k, 0) + v
    return totals


# --- 1. kill -9 of a worker's whole process tree in the middle of a batch ----------------------------------------


def test_worker_tree_killed_during_a_batch_then_restarted(private_redis, stacks, mlp_package):
    stack = stacks("postgres", broker_url=private_redis.url, settings=REAPER)
    stack.start_api()
    worker = stack.start_worker(concurrency=4)
    client = stack.client(new_team_key(stack.admin, "batch"))
    model = upload(client, "models", mlp_package)
    ids = [submit(client, model["id"]) for _ in range(BATCH)]

    deadline = time.monotonic() + 180
    while True:  # several sandboxes mid-flight at the moment of the kill
        running = {j: procs for j, procs in sandboxes().items() if j in ids}
        if len(running) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(running) >= 3, f"only {len(running)} sandboxes at once"
    t_kill = time.monotonic()
    stack.kill_worker_tree(worker)
    _, alive = psutil.wait_procs([p for procs in running.values() for p in procs], timeout=5)
    assert not alive, "the sandboxes die with their worker"
    before = {j: client.get(f"/v1/jobs/{j}").json() for j in ids}
    assert all(j["status"] in ("queued", "running", "succeeded") for j in before.values())

    stack.start_worker(concurrency=4)
    jobs = wait_all(client, ids, timeout=300)
    elapsed = time.monotonic() - t_kill
    assert_ran_once(client, jobs)
    for job_id in running:  # the jobs killed mid-flight ran again, once
        assert jobs[job_id]["attempts"] == 2, (job_id, jobs[job_id]["attempts"])
    assert not set(sandboxes()) & set(ids)
    counts = {s: sum(1 for j in before.values() if j["status"] == s) for s in ("queued", "running", "succeeded")}
    requeued = sum(j["attempts"] - 1 for j in jobs.values())
    print(f"\n[kill -9] at the kill: {len(running)} sandboxes, rows {counts}; all {BATCH} succeeded "
          f"{elapsed:.1f} s after it; {requeued} jobs requeued, reapers: API {reaper_counts(stack.log_dir / 'api.log')}")


# --- 2. Redis restarted with its data lost while jobs are queued -------------------------------------------------


def test_redis_restart_loses_the_queue_and_the_reaper_sends_it_again(private_redis, stacks, mlp_package):
    import redis

    stack = stacks("postgres", broker_url=private_redis.url, settings={**REAPER, "SQUEEZE_REQUEUE_AFTER_S": "3"})
    stack.start_api()
    client = stack.client(new_team_key(stack.admin, "broker"))
    model = upload(client, "models", mlp_package)
    ids = [submit(client, model["id"]) for _ in range(BATCH)]
    broker = redis.Redis.from_url(private_redis.url)
    queued_messages = sum(broker.llen(k) for k in broker.keys() if broker.type(k) == b"list")
    assert queued_messages >= BATCH

    t_restart = time.monotonic()
    private_redis.kill()
    private_redis.start()  # the same port, nothing in it
    assert broker.dbsize() == 0
    assert all(client.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in ids)

    stack.start_worker(concurrency=4)
    jobs = wait_all(client, ids, timeout=300)
    elapsed = time.monotonic() - t_restart
    assert_ran_once(client, jobs)
    assert all(job["attempts"] == 1 for job in jobs.values())  # re-sent, not re-run
    counts = reaper_counts(stack.log_dir / "api.log")
    assert counts["resent"] >= BATCH, counts
    print(f"\n[redis lost] all {BATCH} succeeded {elapsed:.1f} s after the restart; API reaper {counts}; "
          f"worker reaper {reaper_counts(stack.log_dir / 'worker0.log')}")


# --- 3. PostgreSQL stopped and started again under load ----------------------------------------------------------


class Clients:
    """A few API clients in threads (uploading, submitting, polling, /readyz) that record every answer with the time
    its request started; `paused()` holds them (no request in flight) for a while."""

    KINDS = ("upload", "submit", "poll", "ready")

    def __init__(self, stack: Stack, key: str, model_id: str):
        self.stack, self.key, self.model_id = stack, key, model_id
        self.stop, self.hold = threading.Event(), threading.Event()
        self.answers: list[tuple[float, str, int, dict, dict]] = []  # started at, kind, status, body, headers
        self.failures: list[tuple[float, str, str]] = []  # transport errors (no HTTP answer at all)
        self.uploads: list[str] = []
        self.jobs: list[str] = []
        self.in_flight = 0
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True) for kind in self.KINDS]

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.hold.clear()
        with self.cond:
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=60)

    def pause(self) -> None:
        with self.cond:
            self.hold.set()
            self.cond.wait_for(lambda: self.in_flight == 0, timeout=60)

    def resume(self) -> None:
        with self.cond:
            self.hold.clear()
            self.cond.notify_all()

    def _once(self, http: httpx.Client, kind: str) -> httpx.Response:
        if kind == "upload":  # a new dataset each time: a new blob and a new row
            import io

            buf = io.BytesIO()
            np.savez(buf, x=np.random.default_rng().random((32, 64), dtype=np.float32))
            return http.post("/v1/datasets", params={"name": "d.npz"}, content=buf.getvalue())
        if kind == "submit":
            return http.post("/v1/jobs", json={"model_id": self.model_id, "recipe": LEAN_RECIPE})
        if kind == "poll":
            target = self.jobs[-1] if self.jobs else None
            return http.get(f"/v1/jobs/{target}" if target else f"/v1/models/{self.model_id}")
        return http.get("/readyz")

    def _loop(self, kind: str) -> None:
        pause = {"upload": 0.25, "submit": 2.0, "poll": 0.1, "ready": 0.2}[kind]
        with self.stack.client(self.key) as http:
            while not self.stop.is_set():
                with self.cond:
                    self.cond.wait_for(lambda: not self.hold.is_set() or self.stop.is_set())
                    self.in_flight += 1
                t = time.monotonic()
                try:
                    r = self._once(http, kind)
                except httpx.HTTPError as exc:
                    with self.cond:
                        self.failures.append((t, kind, repr(exc)))
                else:
                    try:
                        body = r.json()
                    except ValueError:
                        body = {"not_json": r.text[:200]}
                    with self.cond:
                        self.answers.append((t, kind, r.status_code, body, dict(r.headers)))
                        if r.status_code == 201 and kind == "upload":
                            self.uploads.append(body["id"])
                        if r.status_code == 202 and kind == "submit":
                            self.jobs.append(body["id"])
                finally:
                    with self.cond:
                        self.in_flight -= 1
                        self.cond.notify_all()
                self.stop.wait(pause)


def wait_running(clients: Clients, timeout: float = 120) -> set[str]:
    """The clients' jobs with a sandbox running, once there is one."""
    deadline = time.monotonic() + timeout
    while not (running := set(sandboxes()) & set(clients.jobs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running, "a job should be running"
    return running


def test_postgres_restart_under_load(private_pg, private_redis, stacks, mlp_package):
    stack = stacks("postgres", pg_admin_url=private_pg.admin_url, broker_url=private_redis.url, settings=REAPER)
    stack.start_api()
    stack.start_worker(concurrency=2)
    key = new_team_key(stack.admin, "load")
    with stack.client(key) as client:
        model = upload(client, "models", mlp_package)
    with Clients(stack, key, model["id"]) as clients:
        # (1) Down for 6 s under traffic, with a job mid-flight: every answer meanwhile is a clear 503, service comes
        # back by itself, and the job (its heartbeats retried, the outage shorter than the heartbeat timeout) goes on.
        time.sleep(2)
        running_at_stop = wait_running(clients)
        t_down = time.monotonic()
        private_pg.stop("immediate")
        time.sleep(6)
        t_up = time.monotonic()
        private_pg.start()
        t_started = time.monotonic()
        time.sleep(5)
        # (2) A quick restart (as an operator's `pg_ctl restart` or a failover) while no request is in flight and a
        # job is mid-flight: the pools' connections all died, and no client, job or worker may notice.
        mid = wait_running(clients)
        clients.pause()
        t_quick = time.monotonic()
        private_pg.stop("immediate")
        private_pg.start()
        quick_took = time.monotonic() - t_quick
        clients.resume()
        time.sleep(4)
    answers, failures = clients.answers, clients.failures
    assert not failures, failures[:5]  # the API always answered

    wrong = [(round(t - t_down, 2), kind, status, body) for t, kind, status, body, _ in answers
             if not (200 <= status < 300 or status == 503)]
    assert not wrong, wrong[:5]  # no 500, no 401 from a key that could not be looked up
    for t, kind, status, body, headers in answers:
        if status != 503:
            continue
        if kind == "ready":
            assert body["status"] == "unavailable" and body["checks"]["database"] is False, body
        else:
            assert body["error"]["code"] == "database_unavailable", body
            assert headers.get("retry-after"), headers
    after_quick = [(round(t - t_quick, 2), kind, status, body) for t, kind, status, body, _ in answers
                   if t > t_quick and status != 200 and status // 100 != 2]
    assert not after_quick, after_quick[:5]  # (2): invisible to clients

    by_kind: dict[str, dict[str, float | int]] = {}
    for kind in Clients.KINDS:
        mine = [(t, status) for t, k, status, *_ in answers if k == kind and t < t_quick]
        during = [status for t, status in mine if t_down + 1 < t < t_up]
        assert during and all(status == 503 for status in during), (kind, during)  # the outage: visible, and clear
        first_ok = next((t for t, status in mine if t >= t_up and 200 <= status < 300), None)
        assert first_ok is not None, f"{kind}: no success after PostgreSQL came back"
        # After the first success, nothing fails again: no dead connection was kept in a pool.
        assert not [t for t, status in mine if t > first_ok and status == 503], kind
        by_kind[kind] = {"first_503_s": round(min(t for t, status in mine if status == 503) - t_down, 2),
                         "503s": len([status for _, status in mine if status == 503]),
                         "first_2xx_after_start_s": round(first_ok - t_up, 2)}

    with stack.client(key) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        for ident in clients.uploads:  # every upload that got a 201 is there
            assert client.get(f"/v1/datasets/{ident}").status_code == 200, ident
        jobs = wait_all(client, clients.jobs, timeout=300)  # every job that got a 202 finishes, and succeeds
        assert_ran_once(client, jobs)
        for job_id in running_at_stop | mid:  # the jobs running across either outage were not even requeued
            assert jobs[job_id]["attempts"] == 1, (job_id, events(client, job_id))
    attempts = sorted(j["attempts"] for j in jobs.values())
    print(f"\n[postgres] (1) down {t_up - t_down:.1f} s with {len(running_at_stop)} job(s) running, pg_ctl start "
          f"took {t_started - t_up:.2f} s; per client {by_kind}; (2) restart in {quick_took:.2f} s with {len(mid)} job(s) running: no error; "
          f"{len(answers)} answers in all, {sum(1 for a in answers if a[2] == 503)} of them 503; "
          f"{len(clients.uploads)} uploads and {len(jobs)} jobs accepted, all there / succeeded (attempts {attempts}); "
          f"reapers: API {reaper_counts(stack.log_dir / 'api.log')}")


# --- 4. the disk under the blob store (and the upload temp dir) full ---------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount -t tmpfs of a given size on a folder; unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False, capture_output=True)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=False)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def npz_of(path: Path, mib: float) -> Path:
    """A valid dataset of about `mib` MiB (random floats: incompressible)."""
    n = int(mib * 1024 * 1024 / 4 / 64)
    return modelzoo.write_npz(path, np.random.default_rng(0).random((n, 64), dtype=np.float32))


def fill(folder: Path) -> Path:
    """Writes a file until the disk under `folder` is full."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    with open(filler, "ab", buffering=0) as f:  # the last partial block too
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    assert shutil.disk_usage(folder).free < 64 * 1024
    return filler


def test_disk_full_uploads_and_artifacts(tmpfs, stacks, mlp_package, tmp_path):
    # The layout makes each case real: the upload temp dir (data_dir/tmp, 8 MiB) and the blob store (4 MiB) are two
    # small disks of their own; the database, broker and job directories stay on the big one.
    data_dir = tmp_path / "data"
    tmp_disk = tmpfs(data_dir / "tmp", "8m")
    blob_disk = tmpfs(tmp_path / "blobs", "4m")
    stack = stacks("sqlite", data_dir, settings={**REAPER, "SQUEEZE_BLOB_URL": f"file://{blob_disk}"})
    stack.start_api()
    worker = stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "disk"))

    def assert_nothing_kept(blobs_before: list[str]) -> None:
        assert client.get("/v1/datasets").json()["data"] == []
        assert files_under(blob_disk) == blobs_before  # no partial blob, under any name
        assert files_under(tmp_disk) == []  # no temp file

    # (a1) fits the temp dir but not the blob store: the copy into the store hits ENOSPC.
    six = npz_of(tmp_path / "six.npz", 6)
    r = client.post("/v1/datasets", params={"name": "six.npz"}, content=six.read_bytes())
    assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full", r.text
    assert_nothing_kept([])
    # (a2) larger than the temp dir, with a Content-Length: refused before a byte is read.
    ten = npz_of(tmp_path / "ten.npz", 10)
    r = client.post("/v1/datasets", params={"name": "ten.npz"}, content=ten.read_bytes())
    assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full", r.text
    assert_nothing_kept([])

    # (a3) larger than the temp dir, streamed without a length (chunked): the write hits ENOSPC half-way.
    def chunks():
        with open(ten, "rb") as f:
            while block := f.read(256 * 1024):
                yield block

    try:
        r = client.post("/v1/datasets", params={"name": "ten.npz"}, content=chunks())
        assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full", r.text
        chunked = f"{r.status_code} {r.json()['error']['code']}"
    except httpx.WriteError as exc:  # the server answered and closed while the body was still being sent
        chunked = repr(exc)
    assert_nothing_kept([])

    # A small upload works afterwards: nothing was left holding the space.
    model = upload(client, "models", mlp_package)
    stored = files_under(blob_disk)
    assert len(stored) == 1

    # (b) the blob store full when the worker stores a job's artifacts.
    filler = fill(blob_disk)
    job_id = submit(client, model["id"])
    failed = wait_for(client, job_id, timeout=180)
    assert failed["status"] == "failed" and failed["error"]["code"] == "storage_full", failed
    assert failed["artifacts"] == []  # no artifact row without its blob
    assert files_under(blob_disk) == sorted([*stored, "filler"])
    assert files_under(tmp_disk) == []
    assert worker.poll() is None

    # The worker keeps serving once space is freed; the artifacts are whole.
    filler.unlink()
    job_id = submit(client, model["id"])
    job = wait_for(client, job_id, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    for art in job["artifacts"]:
        r = client.get(art["url"])
        assert r.status_code == 200 and r.headers["etag"] == f'"{art["sha256"]}"', art
    print(f"\n[disk full] chunked upload past the temp disk: {chunked}; the job on a full store: {failed['error']}")
