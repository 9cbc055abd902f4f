"""Runs a recipe's steps in order on a loaded model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from app.recipes import Recipe
from worker.engine.datasets import Dataset
from worker.engine.formats.base import LoadedModel
from worker.engine.passes import Pass, StepContext, StepReport, pass_for

# progress(fraction of all steps done, stage like "steps[0].prune", message)
Progress = Callable[[float, str, str], None]


@dataclass
class AppliedStep:
    """A step as it applied: its pass (which may still export an output and amend its report) and its report."""

    pass_: Pass
    report: StepReport


def apply_steps(model: LoadedModel, recipe: Recipe, *, datasets: dict[str, Dataset] | None = None, threads: int = 1,
                workdir: Path = Path("."), progress: Progress | None = None,
                on_step_done: Callable[[StepReport], None] | None = None,
                on_event: Callable[[str, dict], None] | None = None,
                teachers: dict[str, tuple[Path, str]] | None = None, device: str = "cpu",
                timing: tuple[int, int] = (1, 32), outputs: list[str] | None = None) -> list[AppliedStep]:
    """Apply every step in place; each report gets `index`, `stage` and `seconds` added."""
    applied: list[AppliedStep] = []
    teachers = {"original": (model.path, model.format), **(teachers or {})}  # "original": the file as uploaded
    n = len(recipe.steps)
    for i, spec in enumerate(recipe.steps):
        stage = f"steps[{i}].{spec.type}"

        def step_progress(fraction: float, message: str, i: int = i, stage: str = stage) -> None:
            if progress is not None:
                progress((i + min(max(fraction, 0.0), 1.0)) / n, stage, message)

        def step_event(name: str, data: dict, i: int = i, stage: str = stage) -> None:
            if on_event is not None:
                on_event(name, {"step": i, "stage": stage, **data})

        step_progress(0.0, f"starting {spec.type}")
        ctx = StepContext(index=i, datasets=datasets or {}, threads=threads, workdir=workdir, progress=step_progress,
                          event=step_event, teachers=teachers, device=device, timing=timing,
                          outputs=list(outputs or []), earlier=[a.pass_ for a in applied])
        started = time.perf_counter()
        step = pass_for(spec)
        report = step.apply(model, spec, ctx)
        report = {"index": i, "stage": stage, **report, "seconds": round(time.perf_counter() - started, 4)}
        applied.append(AppliedStep(step, report))
        step_progress(1.0, f"{spec.type} done")
        if on_step_done is not None:
            on_step_done(report)
    return applied


def run_steps(model: LoadedModel, recipe: Recipe, **options: Any) -> list[StepReport]:
    """apply_steps, for a caller that wants the step reports only (nothing is exported)."""
    return [a.report for a in apply_steps(model, recipe, **options)]
