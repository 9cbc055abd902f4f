"""Load: concurrent clients of several teams upload, submit, poll, list and download for a fixed window against one
API process and two Celery worker processes on PostgreSQL + Redis, on loopback. Then the backlog drains (bounded)
and everything is checked: every accepted job exists, is terminal and ran once, every upload is intact.

    python -m bench.run load                      # 20 clients, 300 s
    SQUEEZE_LOAD_SECONDS=30 python -m bench.run load   # a smoke run (the JSON says how long it ran)

Each request is timed from send to the last byte read; per endpoint (method + route template): count, errors (5xx or
no answer at all), unexpected 4xx, p50/p95/p99/max. SQUEEZE_LOAD_LOGS=<dir> keeps the API's and workers' logs.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import os
import random
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import psutil

from testing import modelzoo
from testing.stack import ROOT, Stack, make_backend

TERMINAL = ("succeeded", "failed", "canceled")
JOB_RECIPE = "prune-50"  # preset: global magnitude pruning to 50%, evaluated on the eval dataset
# Think time between one client's requests (uniform, seconds) and its job pacing.
THINK_S = (0.1, 0.5)
MAX_OUTSTANDING = 2  # a client's jobs not yet seen terminal
SUBMIT_GAP_S = 10.0  # least time between one client's submits


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Recorder:
    """Latency samples and failures per endpoint."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter = collections.Counter()
        self.unexpected_4xx: collections.Counter = collections.Counter()
        self.examples: list[dict] = []
        self.kinds: collections.Counter = collections.Counter()

    def note(self, endpoint: str, kind: str, detail: str) -> None:
        self.kinds[kind] += 1
        if len(self.examples) < 30:
            self.examples.append({"endpoint": endpoint, "kind": kind, "detail": detail[:400],
                                  "at": time.strftime("%H:%M:%S")})

    async def call(self, client: httpx.AsyncClient, method: str, template: str, url: str,
                   expect: tuple[int, ...] = (200,), **kwargs) -> httpx.Response | None:
        endpoint = f"{method} {template}"
        t0 = time.perf_counter()
        try:
            resp = await client.request(method, url, **kwargs)
            await resp.aread()
        except httpx.HTTPError as exc:
            self.samples[endpoint].append((time.perf_counter() - t0) * 1000)
            self.errors[endpoint] += 1
            self.note(endpoint, "connection", f"{type(exc).__name__}: {exc}")
            return None
        self.samples[endpoint].append((time.perf_counter() - t0) * 1000)
        if resp.status_code >= 500:
            self.errors[endpoint] += 1
            self.note(endpoint, str(resp.status_code), resp.text)
            return None
        if resp.status_code not in expect:
            self.unexpected_4xx[endpoint] += 1
            self.note(endpoint, str(resp.status_code), resp.text)
            return None
        return resp

    def table(self) -> dict[str, dict]:
        out = {}
        for endpoint in sorted(self.samples):
            s = self.samples[endpoint]
            out[endpoint] = {"requests": len(s), "errors": self.errors[endpoint],
                             "unexpected_4xx": self.unexpected_4xx[endpoint],
                             "p50_ms": round(statistics.median(s), 1), "p95_ms": round(_pct(s, 0.95), 1),
                             "p99_ms": round(_pct(s, 0.99), 1), "max_ms": round(max(s), 1)}
        return out

    def totals(self) -> tuple[int, int, int]:
        return (sum(len(s) for s in self.samples.values()), sum(self.errors.values()),
                sum(self.unexpected_4xx.values()))


@dataclass
class Upload:
    kind: str  # models | datasets
    id: str
    sha256: str
    fmt: str


@dataclass
class Team:
    name: str
    key: str
    models: list[Upload] = field(default_factory=list)
    datasets: list[Upload] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)  # accepted (2xx) at submit
    status: dict[str, str] = field(default_factory=dict)  # last status a client saw
    artifacts: dict[str, list[dict]] = field(default_factory=dict)  # job id -> artifacts, once terminal


@dataclass
class Files:
    models: dict[str, tuple[str, bytes]]  # format -> (file name, bytes)
    eval_x: np.ndarray
    eval_y: np.ndarray

    def dataset(self, rng: random.Random) -> bytes:
        """A labelled eval set: a random 200-360 rows of the hold-out, so most uploads are new blobs."""
        n = len(self.eval_x)
        idx = sorted(rng.sample(range(n), rng.randint(200, n)))
        buf = io.BytesIO()
        np.savez(buf, x=self.eval_x[idx], labels=self.eval_y[idx].astype(np.int64))
        return buf.getvalue()


def prepare_files(workdir: Path) -> Files:
    _, _, x_test, y_test = modelzoo.digits_split()
    mlp = modelzoo.train_mlp()
    paths = {"pt2": modelzoo.export_pt2(mlp, x_test, workdir / "mlp.pt2"),
             "onnx": modelzoo.export_onnx(mlp, x_test, workdir / "mlp.onnx"),
             "package": modelzoo.write_package(mlp, workdir / "mlp.zip", modelzoo.MLP_SOURCE)}
    return Files({fmt: (p.name, p.read_bytes()) for fmt, p in paths.items()}, x_test, y_test)


async def upload(rec: Recorder, client: httpx.AsyncClient, team: Team, kind: str, fmt: str, name: str,
                 body: bytes) -> None:
    resp = await rec.call(client, "POST", f"/v1/{kind}", f"/v1/{kind}", expect=(201,), params={"name": name},
                          content=body, headers={"Content-Type": "application/octet-stream"})
    if resp is None:
        return
    row = resp.json()
    sha = hashlib.sha256(body).hexdigest()
    if row["sha256"] != sha:
        rec.note(f"POST /v1/{kind}", "sha_mismatch", f"{row['id']}: server {row['sha256']} != {sha}")
    (team.models if kind == "models" else team.datasets).append(Upload(kind, row["id"], sha, fmt))


async def download(rec: Recorder, client: httpx.AsyncClient, template: str, url: str, sha: str) -> bool:
    resp = await rec.call(client, "GET", template, url)
    if resp is None:
        return False
    got, etag = hashlib.sha256(resp.content).hexdigest(), resp.headers.get("etag", "").strip('"')
    if got != sha or etag != sha:
        rec.note(f"GET {template}", "sha_mismatch", f"{url}: body {got}, etag {etag}, expected {sha}")
        return False
    return True


@dataclass
class ClientState:
    outstanding: list[str] = field(default_factory=list)
    last_submit: float = -1e9
    downloaded: set = field(default_factory=set)


async def run_client(n: int, stack_url: str, team: Team, files: Files, rec: Recorder, deadline: float,
                     counters: collections.Counter) -> None:
    rng = random.Random(1000 + n)
    me = ClientState()
    async with httpx.AsyncClient(base_url=stack_url, headers={"Authorization": f"Bearer {team.key}"},
                                 timeout=120) as client:
        await asyncio.sleep(rng.uniform(0, 2))  # do not start all 20 in the same millisecond
        while time.monotonic() < deadline:
            now = time.monotonic()
            if len(me.outstanding) < MAX_OUTSTANDING and now - me.last_submit >= SUBMIT_GAP_S and team.models:
                model = rng.choice(team.models)
                body = {"model_id": model.id, "recipe": JOB_RECIPE, "datasets": {"eval": rng.choice(team.datasets).id}}
                me.last_submit = now
                resp = await rec.call(client, "POST", "/v1/jobs", "/v1/jobs", expect=(202,), json=body)
                if resp is not None:
                    job_id = resp.json()["id"]
                    team.jobs.append(job_id)
                    me.outstanding.append(job_id)
                    counters["submitted"] += 1
            else:
                action = rng.choices(["poll", "list", "events", "artifact", "meta", "file", "upload_model",
                                      "upload_dataset", "list_models"],
                                     weights=[35, 12, 12, 14, 8, 5, 2, 2, 3])[0]
                if action == "poll" and me.outstanding:
                    job_id = rng.choice(me.outstanding)
                    resp = await rec.call(client, "GET", "/v1/jobs/{job_id}", f"/v1/jobs/{job_id}")
                    if resp is not None:
                        job = resp.json()
                        team.status[job_id] = job["status"]
                        if job["status"] in TERMINAL:
                            me.outstanding.remove(job_id)
                            team.artifacts[job_id] = job["artifacts"]
                elif action == "list" or (action == "poll" and not me.outstanding):
                    params = {"limit": 20}
                    if rng.random() < 0.3:
                        params["status"] = rng.choice(["queued", "running", "succeeded"])
                    await rec.call(client, "GET", "/v1/jobs", "/v1/jobs", params=params)
                elif action == "events" and team.jobs:
                    job_id = rng.choice(team.jobs)
                    await rec.call(client, "GET", "/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/events")
                elif action == "artifact" and team.artifacts:
                    pending = [(j, a) for j, arts in list(team.artifacts.items()) for a in arts
                               if (j, a["name"]) not in me.downloaded]
                    if pending:
                        job_id, art = rng.choice(pending)
                        ok = await download(rec, client, "/v1/jobs/{job_id}/artifacts/{name}",
                                            f"/v1/jobs/{job_id}/artifacts/{art['name']}", art["sha256"])
                        me.downloaded.add((job_id, art["name"]))
                        counters["artifacts_downloaded_ok" if ok else "artifacts_download_failed"] += 1
                elif action in ("meta", "file"):
                    item = rng.choice(team.models + team.datasets)
                    if action == "meta":
                        resp = await rec.call(client, "GET", f"/v1/{item.kind}/{{ident}}", f"/v1/{item.kind}/{item.id}")
                        if resp is not None and resp.json()["sha256"] != item.sha256:
                            rec.note(f"GET /v1/{item.kind}/{{ident}}", "sha_mismatch", item.id)
                    else:
                        ok = await download(rec, client, f"/v1/{item.kind}/{{ident}}/file",
                                            f"/v1/{item.kind}/{item.id}/file", item.sha256)
                        counters["files_downloaded_ok" if ok else "files_download_failed"] += 1
                elif action == "upload_model":
                    fmt = rng.choice(sorted(files.models))
                    name, data = files.models[fmt]
                    await upload(rec, client, team, "models", fmt, name, data)
                    counters["models_uploaded"] += 1
                elif action == "upload_dataset":
                    await upload(rec, client, team, "datasets", "npz", f"eval-{n}.npz", files.dataset(rng))
                    counters["datasets_uploaded"] += 1
                elif action == "list_models":
                    await rec.call(client, "GET", "/v1/models", "/v1/models", params={"limit": 20})
            await asyncio.sleep(rng.uniform(*THINK_S))


async def drain(stack_url: str, teams: list[Team], timeout: float) -> float | None:
    """Polls every accepted job until all are terminal; the seconds it took, or None past `timeout`."""
    t0 = time.monotonic()
    pending = {(t.key, j) for t in teams for j in t.jobs if t.status.get(j) not in TERMINAL}
    clients = {t.key: httpx.AsyncClient(base_url=stack_url, headers={"Authorization": f"Bearer {t.key}"},
                                        timeout=120) for t in teams}
    try:
        while pending and time.monotonic() - t0 < timeout:
            for key, job_id in sorted(pending):
                r = await clients[key].get(f"/v1/jobs/{job_id}")
                if r.status_code == 200 and r.json()["status"] in TERMINAL:
                    pending.discard((key, job_id))
            if pending:
                await asyncio.sleep(2)
    finally:
        for c in clients.values():
            await c.aclose()
    return None if pending else time.monotonic() - t0


async def verify(stack_url: str, teams: list[Team]) -> dict:
    """Nothing lost: every accepted job exists, is terminal, ran once, and its artifacts are intact; the team's list
    holds exactly the accepted jobs; every upload is retrievable with the same bytes."""
    rec = Recorder()
    out: dict = {"statuses": collections.Counter(), "error_codes": collections.Counter(), "missing_jobs": [],
                 "not_terminal": [], "ran_more_than_once": [], "bad_events": [], "artifacts_checked": 0,
                 "artifacts_bad": [], "unlisted_jobs": [], "unknown_jobs": [], "uploads_checked": 0,
                 "uploads_bad": [], "jobs": [], "per_worker": collections.Counter()}
    sem = asyncio.Semaphore(8)
    for team in teams:
        async with httpx.AsyncClient(base_url=stack_url, headers={"Authorization": f"Bearer {team.key}"},
                                     timeout=120) as client:

            async def check_job(job_id: str) -> None:
                async with sem:
                    r = await rec.call(client, "GET", "/v1/jobs/{job_id}", f"/v1/jobs/{job_id}")
                    if r is None:
                        out["missing_jobs"].append(job_id)
                        return
                    job = r.json()
                    out["statuses"][job["status"]] += 1
                    if job["status"] not in TERMINAL:
                        out["not_terminal"].append(job_id)
                    if job["error"]:
                        out["error_codes"][job["error"]["code"]] += 1
                    if job["attempts"] != 1:
                        out["ran_more_than_once"].append({"id": job_id, "attempts": job["attempts"]})
                    ev = await rec.call(client, "GET", "/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/events")
                    events = ev.json()["data"] if ev is not None else []
                    types = collections.Counter(e["type"] for e in events)
                    for e in events:
                        if e["type"] == "started":
                            out["per_worker"][str(e["data"].get("worker", "?")).split("@")[0].rsplit("-", 1)[0]] += 1
                    if (types.get("started", 0) != job["attempts"] or types.get(job["status"], 0) != 1
                            or sum(types.get(s, 0) for s in TERMINAL) != 1):
                        out["bad_events"].append({"id": job_id, "status": job["status"], "events": dict(types)})
                    names = [a["name"] for a in job["artifacts"]]
                    if len(names) != len(set(names)):
                        out["bad_events"].append({"id": job_id, "duplicate_artifacts": names})
                    for art in job["artifacts"]:
                        out["artifacts_checked"] += 1
                        if not await download(rec, client, "/v1/jobs/{job_id}/artifacts/{name}",
                                              f"/v1/jobs/{job_id}/artifacts/{art['name']}", art["sha256"]):
                            out["artifacts_bad"].append(f"{job_id}/{art['name']}")
                    out["jobs"].append(job)

            async def check_upload(item: Upload) -> None:
                async with sem:
                    out["uploads_checked"] += 1
                    r = await rec.call(client, "GET", f"/v1/{item.kind}/{{ident}}", f"/v1/{item.kind}/{item.id}")
                    if r is None or r.json()["sha256"] != item.sha256 or not await download(
                            rec, client, f"/v1/{item.kind}/{{ident}}/file", f"/v1/{item.kind}/{item.id}/file",
                            item.sha256):
                        out["uploads_bad"].append(item.id)

            await asyncio.gather(*(check_job(j) for j in team.jobs),
                                 *(check_upload(u) for u in team.models + team.datasets))
            listed, after = set(), None
            while True:
                params = {"limit": 200, **({"after": after} if after else {})}
                page = (await client.get("/v1/jobs", params=params)).json()
                listed |= {j["id"] for j in page["data"]}
                if not page["has_more"]:
                    break
                after = page["next"]
            out["unlisted_jobs"] += sorted(set(team.jobs) - listed)
            out["unknown_jobs"] += sorted(listed - set(team.jobs))
    total, errors, unexpected = rec.totals()
    out["verify_requests"], out["verify_errors"], out["verify_unexpected_4xx"] = total, errors, unexpected
    out["verify_examples"] = rec.examples
    out["verify_sha_mismatches"] = rec.kinds["sha_mismatch"]
    return out


def _queue_figures(jobs: list[dict], window_start: float, window_end: float) -> dict:
    """From the server's timestamps: the largest queue (created, not yet started), waits, run times, throughput."""
    marks = []
    for j in jobs:
        created = _ts(j["created_at"])
        left = _ts(j["started_at"]) if j["started_at"] else (_ts(j["finished_at"]) if j["finished_at"] else None)
        marks.append((created, 1))
        if left is not None:
            marks.append((left, -1))
    depth = peak = 0
    for _, d in sorted(marks):
        depth += d
        peak = max(peak, depth)
    done = [j for j in jobs if j["finished_at"]]
    waits = [_ts(j["started_at"]) - _ts(j["created_at"]) for j in jobs if j["started_at"]]
    runs = [_ts(j["finished_at"]) - _ts(j["started_at"]) for j in done if j["started_at"]]
    finished = [_ts(j["finished_at"]) for j in done]
    first = min((_ts(j["created_at"]) for j in jobs), default=window_start)
    span = (max(finished) - first) if finished else 0
    in_window = sum(f <= window_end for f in finished)
    return {"max_queued": peak, "queued_at_window_end": sum(
                _ts(j["created_at"]) <= window_end and (not j["started_at"] or _ts(j["started_at"]) > window_end)
                for j in jobs),
            "completed_in_window": in_window,
            "jobs_per_min_in_window": round(in_window / ((window_end - window_start) / 60), 1),
            "jobs_per_min_overall": round(len(done) / (span / 60), 1) if span else 0,
            "queue_wait_p50_s": round(statistics.median(waits), 1) if waits else None,
            "queue_wait_max_s": round(max(waits), 1) if waits else None,
            "job_run_p50_s": round(statistics.median(runs), 2) if runs else None,
            "job_run_p95_s": round(_pct(runs, 0.95), 2) if runs else None,
            "last_finished_after_window_s": round(max(finished) - window_end, 1) if finished else None}


def _log_problems(log_dir: Path) -> dict:
    """Lines with a traceback or an ERROR/CRITICAL level in the API's and workers' logs (first few kept)."""
    found: dict = {}
    for log in sorted(log_dir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if "Traceback" in ln or '"level": "ERROR"' in ln or "ERROR/" in ln
               or '"level": "CRITICAL"' in ln or " CRITICAL" in ln]
        found[log.stem] = {"lines": len(lines), "problem_lines": len(bad), "first": [b[:300] for b in bad[:5]]}
    return found


def _shared_machine() -> dict:
    """What else was running: the load average and other test processes (this machine is shared)."""
    me = os.getpid()
    others = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.info["pid"] != me and ("pytest" in cmd or "bench.run" in cmd):
            others += 1
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "other_test_processes": others}


def _git() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "app", "worker", "migrations").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_in_app_worker_migrations": dirty}


async def _load(stack: Stack, teams: list[Team], files: Files, clients: int, seconds: float) -> dict:
    rec, counters = Recorder(), collections.Counter()
    start = time.monotonic()
    window_start = time.time()
    await asyncio.gather(*(run_client(i, stack.url, teams[i % len(teams)], files, rec, start + seconds, counters)
                           for i in range(clients)))
    window_end = time.time()
    elapsed = time.monotonic() - start
    machine_mid = _shared_machine()
    return {"rec": rec, "counters": counters, "window_start": window_start, "window_end": window_end,
            "elapsed": elapsed, "machine_at_window_end": machine_mid}


def bench_load(workdir: Path, clients: int = 20, seconds: float | None = None, teams: int = 4,
               workers: int = 2, drain_timeout: float = 600) -> dict:
    seconds = float(seconds if seconds is not None else os.environ.get("SQUEEZE_LOAD_SECONDS", 300))
    files = prepare_files(workdir)
    data_dir = workdir / "data"
    data_dir.mkdir()
    stack = Stack(make_backend("postgres", data_dir), data_dir, workdir, SQUEEZE_SANDBOX_THREADS="1")
    machine_start = _shared_machine()
    try:
        stack.start_api()
        for _ in range(workers):
            stack.start_worker(concurrency=1)
        from testing.fleet import wait_ready

        wait_ready(stack, workers)
        team_rows = []
        for t in range(teams):
            r = stack.admin.post("/v1/keys", json={"team": f"load{t}", "name": "load"})
            r.raise_for_status()
            team_rows.append(Team(f"load{t}", r.json()["key"]))

        async def setup() -> None:  # each team starts with one model of each format and one eval set (not timed)
            rec = Recorder()
            for team in team_rows:
                async with httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {team.key}"},
                                             timeout=120) as client:
                    for fmt, (name, data) in sorted(files.models.items()):
                        await upload(rec, client, team, "models", fmt, name, data)
                    await upload(rec, client, team, "datasets", "npz", "eval.npz", files.dataset(random.Random(0)))
            assert rec.totals()[1:] == (0, 0), rec.examples

        asyncio.run(setup())
        run = asyncio.run(_load(stack, team_rows, files, clients, seconds))
        rec, counters = run["rec"], run["counters"]
        drain_s = asyncio.run(drain(stack.url, team_rows, drain_timeout))
        checked = asyncio.run(verify(stack.url, team_rows))
        import redis

        broker_left = redis.Redis.from_url(stack.backend.broker_url).llen("cpu")
        alive = [w.poll() is None for w in stack.workers] + [stack.api_proc.poll() is None]
        problems = _log_problems(stack.log_dir)
        keep = os.environ.get("SQUEEZE_LOAD_LOGS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for log in stack.log_dir.glob("*.log"):
                shutil.copy(log, Path(keep) / log.name)
    finally:
        stack.stop()

    total, errors, unexpected = rec.totals()
    jobs = checked.pop("jobs")
    queue = _queue_figures(jobs, run["window_start"], run["window_end"])
    statuses = checked["statuses"]
    codes = " ".join(f"{k}={v}" for k, v in sorted(checked["error_codes"].items())) or "-"
    lost = (len(checked["missing_jobs"]) + len(checked["not_terminal"]) + len(checked["unlisted_jobs"])
            + len(checked["uploads_bad"]) + len(checked["artifacts_bad"]))
    summary = {
        "clients": clients, "teams": teams, "workers": workers, "worker_concurrency": 1, "api_processes": 1,
        "backend": "postgresql+redis", "seconds": round(run["elapsed"], 1), "recipe": JOB_RECIPE,
        "requests": total, "req_per_s": round(total / run["elapsed"], 1),
        "errors_5xx_or_connection": errors, "error_rate": round(errors / total, 5) if total else None,
        "unexpected_4xx": unexpected,
        "jobs_submitted": sum(len(t.jobs) for t in team_rows),
        "jobs_succeeded": statuses.get("succeeded", 0), "jobs_failed": statuses.get("failed", 0),
        "jobs_canceled": statuses.get("canceled", 0), "failed_error_codes": codes,
        "drain_s": round(drain_s, 1) if drain_s is not None else f"not drained in {drain_timeout} s",
        **queue,
        "models_uploaded": counters["models_uploaded"], "datasets_uploaded": counters["datasets_uploaded"],
        "artifacts_downloaded_in_window": counters["artifacts_downloaded_ok"],
        "files_downloaded_in_window": counters["files_downloaded_ok"],
        "hash_or_etag_mismatches": rec.kinds["sha_mismatch"] + checked["verify_sha_mismatches"],
        "lost": lost, "jobs_run_more_than_once": len(checked["ran_more_than_once"]),
        "jobs_with_bad_events": len(checked["bad_events"]), "unknown_jobs_listed": len(checked["unknown_jobs"]),
        "uploads_verified": checked["uploads_checked"] - len(checked["uploads_bad"]),
        "artifacts_verified": checked["artifacts_checked"] - len(checked["artifacts_bad"]),
        "jobs_per_worker": " ".join(f"{k}={v}" for k, v in sorted(checked["per_worker"].items())),
        "broker_messages_left": broker_left, "processes_alive_at_end": all(alive),
        "endpoints": rec.table(),
        "verification": {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in checked.items()},
        "error_examples": rec.examples,
        "log_problems": problems,
        "machine": {"at_start": machine_start, "at_window_end": run["machine_at_window_end"],
                    "at_end": _shared_machine()},
        "git": _git(),
    }
    return {f"load_{clients}_clients_{int(seconds)}s": summary}
