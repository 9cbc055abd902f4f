"""`make bench`: runs the benchmark suite and writes bench/results/*.json and bench/RESULTS.md.

    python -m bench.run [service ...]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import service

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = {
    "service": lambda work: {
        "upload_1gib": service.bench_upload(work),
        "submit_to_running": service.bench_submit_latency(work),
        "get_job": service.bench_get_job(work),
        "job_overhead_sqlite": service.bench_job_overhead(work, "sqlite"),
        "job_overhead_postgres_redis": service.bench_job_overhead(work, "postgres"),
    },
}


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str]) -> None:
    names = argv or list(SUITES)
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
            started = time.time()
            result = {"command": f"python -m bench.run {name}", "environment": environment(),
                      "results": SUITES[name](Path(work))}
            result["seconds"] = round(time.time() - started, 1)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
