"""Scale-out bench: 3 workers, 30 jobs on one bucket (testing/fleet.py runs the fleet)."""

from __future__ import annotations

from pathlib import Path

from testing.fleet import run_fleet


def bench_scale(workdir: Path) -> dict:
    result = run_fleet(workdir)
    keep = ("workers", "jobs", "worker_concurrency", "sandbox_threads", "succeeded", "elapsed_s", "jobs_per_minute",
            "median_job_wall_s", "median_job_run_s", "per_worker", "spread")
    return {"fleet_3_workers_30_jobs": {k: result[k] for k in keep}}
