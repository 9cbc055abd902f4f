"""Scale-out: one API and several workers, each with its own data dir, sharing only PostgreSQL, Redis and an
S3-compatible bucket (docs/operations.md#deploying). Used by `python -m bench.run scale` (bench/scale.py) and by
tests/test_e2e_scale.py.
"""

from __future__ import annotations

import collections
import statistics
import time
from datetime import datetime
from pathlib import Path

from testing import modelzoo
from testing.s3 import S3Server, start_s3_server
from testing.stack import Stack, make_backend, wait_for

SMALL_JOB = {"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
             "evaluate": {"repeats": 2, "batch_sizes": [1]}}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def wait_ready(stack: Stack, count: int, timeout: float = 120) -> None:
    """Until every worker's log says it is ready: jobs sent earlier would all land on the first one up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [(stack.log_dir / f"worker{i}.log") for i in range(count)]
        if all(p.exists() and b" ready." in p.read_bytes() for p in logs):
            return
        if any(w.poll() is not None for w in stack.workers):
            break
        time.sleep(0.2)
    raise RuntimeError(f"workers did not all start; see {stack.log_dir}")


def fleet_stack(workdir: Path, s3: S3Server, workers: int, **settings: str) -> Stack:
    """A started API (its own data dir) and `workers` workers (one data dir each, concurrency 1), blobs in a
    fresh bucket on `s3`: nothing on disk is shared between them. The fleet's jobs are one team's, so no per-team
    running-jobs limit unless `settings` sets one."""
    api_dir = workdir / "api-data"
    api_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(make_backend("postgres", api_dir), api_dir, workdir,
                  **s3.settings(s3.new_bucket()),
                  **{"SQUEEZE_SANDBOX_THREADS": "1", "SQUEEZE_TEAM_MAX_RUNNING": "0", **settings})
    stack.start_api()
    for i in range(workers):
        wdir = workdir / f"worker{i}-data"
        wdir.mkdir(parents=True, exist_ok=True)
        stack.start_worker(concurrency=1, env_overrides={"SQUEEZE_DATA_DIR": str(wdir)})
    wait_ready(stack, workers)
    return stack


def run_fleet(workdir: Path, workers: int = 3, jobs: int = 30, s3: S3Server | None = None,
              timeout: float = 300) -> dict:
    """Submits `jobs` small prune jobs (MLP on digits) at once to a fleet of `workers` and waits for all of them.
    Returns throughput, the spread over the workers and every job's outcome."""
    x_train, _, x_test, y_test = modelzoo.digits_split()
    pt2 = modelzoo.export_pt2(modelzoo.train_mlp(), x_test, workdir / "mlp.pt2")
    eval_npz = modelzoo.write_npz(workdir / "eval.npz", x_test, y_test)
    own_s3 = s3 is None
    s3 = s3 or start_s3_server(workdir / "moto.log")
    stack = None
    try:
        stack = fleet_stack(workdir, s3, workers)
        r = stack.admin.post("/v1/keys", json={"team": "fleet", "name": "bench"})
        r.raise_for_status()
        client = stack.client(r.json()["key"])
        model = client.post("/v1/models", params={"name": "mlp.pt2"}, content=pt2.read_bytes()).json()
        ds = client.post("/v1/datasets", params={"name": "eval.npz"}, content=eval_npz.read_bytes()).json()
        started = time.time()
        ids = []
        for _ in range(jobs):
            r = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": SMALL_JOB,
                                              "datasets": {"eval": ds["id"]}})
            r.raise_for_status()
            ids.append(r.json()["id"])
        rows = []
        for job_id in ids:
            done = wait_for(client, job_id, timeout=max(10.0, timeout - (time.time() - started)), interval=0.2)
            events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
            runs_on = [e["data"].get("worker") for e in events if e["type"] == "started"]
            rows.append({"id": job_id, "status": done["status"], "error": done["error"],
                         "worker": runs_on[-1] if runs_on else None, "attempts": done["attempts"],
                         "wall_s": round(_ts(done["finished_at"]) - _ts(done["created_at"]), 3)
                         if done["finished_at"] else None,
                         "run_s": round(_ts(done["finished_at"]) - _ts(done["started_at"]), 3)
                         if done["finished_at"] and done["started_at"] else None,
                         "finished": _ts(done["finished_at"]) if done["finished_at"] else None,
                         "artifacts": done["artifacts"]})
        finished = [r["finished"] for r in rows if r["finished"] is not None]
        elapsed = (max(finished) if finished else time.time()) - started
        per_worker = collections.Counter(r["worker"].split("@")[0].rsplit("-", 1)[0] for r in rows if r["worker"])
        return {"workers": workers, "jobs": jobs, "worker_concurrency": 1, "sandbox_threads": 1,
                "succeeded": sum(r["status"] == "succeeded" for r in rows),
                "elapsed_s": round(elapsed, 1), "jobs_per_minute": round(jobs / elapsed * 60, 1),
                # submit -> finished (mostly waiting: 30 jobs land at once) and started -> finished
                "median_job_wall_s": round(statistics.median(r["wall_s"] for r in rows if r["wall_s"] is not None), 1),
                "median_job_run_s": round(statistics.median(r["run_s"] for r in rows if r["run_s"] is not None), 1),
                "per_worker": dict(sorted(per_worker.items())),
                "spread": " ".join(f"{k}={v}" for k, v in sorted(per_worker.items())),
                "log_dir": str(stack.log_dir), "rows": rows}
    finally:
        if stack is not None:
            stack.stop()
        if own_s3:
            s3.stop()
