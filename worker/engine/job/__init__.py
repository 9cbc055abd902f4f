"""A job run by the sandbox, one module per stage, in the order they run:

  context.py          reads job.json: the recipe, outputs, threads, device, folders
  load.py             load: the model, the datasets, the distillation teachers
  measure_original.py evaluate_original: the original measured (inputs, runtimes, latency, accuracy, outputs)
  steps.py            steps: the recipe applied in place (worker/engine/pipeline.py)
  export.py           write: every output written (a pass may write one itself), then the steps' reports amended
  measure_result.py   evaluate_result: the result re-loaded from disk and measured, timed alternately with the original
  measure_llm.py      both evaluate stages for a causal LM: perplexity on the eval text, generation speed
  report.py           report: metrics, guard, report.json (built as app/report_schema.Report) and report.png

measure.py holds what both measurements share; environment.py what a rerun needs to explain a difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.recipes import EvaluateSpec
from worker.engine.formats.hf import is_causal_lm
from worker.engine.job.context import Channel, open_job
from worker.engine.job.export import export
from worker.engine.job.load import load
from worker.engine.job.measure_llm import measure_original_llm, measure_result_llm
from worker.engine.job.measure_original import measure_original
from worker.engine.job.measure_result import measure_result
from worker.engine.job.report import write_report
from worker.engine.job.steps import run_steps


def run_job(jobdir: Path, channel: Channel) -> dict[str, Any]:
    """Run the job in `jobdir`; returns the protocol's result message. EngineError for a user-side failure.
    A causal LM is measured by worker/engine/llm/measure.py (perplexity, generation speed) instead."""
    job = open_job(jobdir, channel)
    loaded = load(job)
    llm = is_causal_lm(loaded.model)
    if llm:
        lm_defaults(job, loaded)
    original = (measure_original_llm if llm else measure_original)(job, loaded)
    applied = run_steps(job, loaded, original)
    artifacts = export(job, loaded, original, applied)
    result = (measure_result_llm if llm else measure_result)(job, loaded, original, artifacts)
    return write_report(job, loaded, original, [a.report for a in applied], result, artifacts)


def lm_defaults(job, loaded) -> None:
    """What an LM is timed at unless the recipe says otherwise: batch 1 (a window of text.seq_len tokens) and 5
    repeats in place of the defaults [1, 32] and 20 (the stored recipe holds every default, so the default values
    are what is replaced: docs/llm.md); and the GGUF output's type from the steps (q4_0 after 4-bit quantization,
    else q8_0)."""
    ev, recipe = job.ev, job.recipe
    defaults = EvaluateSpec()
    if ev.batch_sizes == defaults.batch_sizes:
        ev.batch_sizes = [1]
    if ev.repeats == defaults.repeats:
        ev.repeats = 5
    four_bit = any(getattr(s, "method", None) == "weight_int4" for s in recipe.steps)
    loaded.model.extra["gguf_type"] = recipe.gguf_type or ("q4_0" if four_bit else "q8_0")
