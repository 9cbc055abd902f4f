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


TARGETS = {  # issue 2's targets, checked against the measured figures in RESULTS.md
    "upload_1gib": ("median_mib_per_s >= 300 and max_rss_growth_mib <= 64",
                    lambda r: r["median_mib_per_s"] >= 300 and r["max_rss_growth_mib"] <= 64),
    "submit_to_running": ("p50_ms <= 100 on Redis", lambda r: r["p50_ms"] <= 100),
    "get_job": ("req_per_s >= 500", lambda r: r["req_per_s"] >= 500),
}


def render(results: dict[str, dict]) -> str:
    """bench/RESULTS.md, written from the JSON results only (never by hand)."""
    lines = ["# Benchmark results", "", "Written by `make bench` from `bench/results/*.json`; do not edit by hand.", ""]
    for name, result in sorted(results.items()):
        env = result["environment"]
        lines += [f"## {name}", "", f"Command: `{result['command']}` ({result['seconds']} s, {env['date']}, "
                  f"{env['cores']} cores, torch {env['torch']}, Python {env['python']})", "",
                  "| benchmark | figures | target | met |", "|---|---|---|---|"]
        for key, figures in result["results"].items():
            summary = {k: v for k, v in figures.items() if not isinstance(v, list)}
            target, check = TARGETS.get(key, ("", None))
            met = "" if check is None else ("yes" if check(figures) else "**no**")
            lines.append(f"| {key} | {', '.join(f'{k}={v}' for k, v in summary.items())} | {target} | {met} |")
        lines.append("")
    return "\n".join(lines)


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
    everything = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    (RESULTS.parent / "RESULTS.md").write_text(render(everything))


if __name__ == "__main__":
    main(sys.argv[1:])
