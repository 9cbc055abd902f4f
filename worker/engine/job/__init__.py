"""A job run by the sandbox, one module per stage, in the order they run:

  context.py          reads job.json: the recipe, outputs, threads, device, folders
  load.py             load: the model, the datasets, the distillation teachers
  measure_original.py evaluate_original: the original measured (inputs, runtimes, latency, accuracy, outputs)
  steps.py            steps: the recipe applied in place (worker/engine/pipeline.py)
  export.py           write: every output written (a pass may write one itself), then the steps' reports amended
  measure_result.py   evaluate_result: the result re-loaded from disk and measured, timed alternately with the original
  report.py           report: metrics, guard, report.json (built as app/report_schema.Report) and report.png

measure.py holds what both measurements share; environment.py what a rerun needs to explain a difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine.job.context import Channel, open_job
from worker.engine.job.export import export
from worker.engine.job.load import load
from worker.engine.job.measure_original import measure_original
from worker.engine.job.measure_result import measure_result
from worker.engine.job.report import write_report
from worker.engine.job.steps import run_steps


def run_job(jobdir: Path, channel: Channel) -> dict[str, Any]:
    """Run the job in `jobdir`; returns the protocol's result message. EngineError for a user-side failure."""
    job = open_job(jobdir, channel)
    loaded = load(job)
    original = measure_original(job, loaded)
    applied = run_steps(job, loaded, original)
    artifacts = export(job, loaded, original, applied)
    result = measure_result(job, loaded, original, artifacts)
    return write_report(job, loaded, original, [a.report for a in applied], result, artifacts)
