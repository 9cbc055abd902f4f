"""The schemathesis fuzzing of tests/app/api/test_fuzz.py at length: many more generated cases per operation than CI
runs, same checks (no 5xx, documented statuses and content types, schema-conformant bodies, invalid input refused),
still derandomized so a rerun is the same run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_fuzz(work: Path, examples: int = 200) -> dict:
    env = {**os.environ, "SQUEEZE_FUZZ_EXAMPLES": str(examples)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:logging",
                           "tests/app/api/test_fuzz.py", "-k", "openapi_fuzz or enough_cases",
                           "--basetemp", str(work / "pytest")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    cases = re.search(r"schemathesis cases run: (\d+)", proc.stdout)
    count = lambda word: int(m.group(1)) if (m := re.search(rf"(\d+) {word}", summary[-1] if summary else "")) else 0
    return {"fuzz_openapi": {
        "examples_per_operation": examples,
        "cases": int(cases.group(1)) if cases else 0,
        "operations_passed": count("subtests passed"),
        "operations_failed": count("failed"),
        "cases_per_s": round(int(cases.group(1)) / seconds, 1) if cases else 0,
        "exit_code": proc.returncode,
    }}
