"""The steps stage: the recipe applied in place, each step's report and events sent on the channel."""

from __future__ import annotations

from worker.engine.job.context import JobContext
from worker.engine.job.load import Loaded
from worker.engine.job.measure_original import Original
from worker.engine.pipeline import AppliedStep, apply_steps


def run_steps(job: JobContext, loaded: Loaded, original: Original) -> list[AppliedStep]:
    channel = job.channel

    def on_progress(fraction: float, stage: str, message: str) -> None:
        channel.progress(stage, fraction, message)

    def on_step(report: dict) -> None:
        channel.send({"type": "event", "name": "step_done", "data": report, "message": step_message(report)})

    def on_event(name: str, data: dict) -> None:
        channel.send({"type": "event", "name": name, "data": data})

    with job.stage("steps", "applying the recipe"):
        return apply_steps(loaded.model, job.recipe, datasets=loaded.datasets, threads=job.threads,
                           workdir=job.work, progress=on_progress, on_step_done=on_step, on_event=on_event,
                           teachers=loaded.teachers, device=job.device,
                           timing=(job.timing_threads, max(job.ev.batch_sizes)), outputs=job.outputs)


def step_message(report: dict) -> str:
    """The step_done event's one line: which step, what it was, how long it took."""
    what = " ".join(str(report[k]) for k in ("type", "method") if report.get(k))
    seconds = report.get("seconds")
    return f"step {report.get('index', '?')} ({what or 'step'}) done" + \
        (f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
