"""`squeeze compress`: check the recipe, upload what is not on the server yet, submit, follow, print, download."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.text import Text

from squeeze_client.cli.common import (CANCELED, GUARD_FAILED, INVALID, JOB_FAILED, JSON_OPTION, OK, console, dump,
                                       err, fail, http_command, make_client, print_field_errors)
from squeeze_client.cli.inputs import FORMAT_OF_SUFFIX, Uploads, local_file, recipe_arg
from squeeze_client.cli.summary import print_results

TERMINAL_STAGE = {"succeeded": "done", "failed": "failed", "canceled": "canceled"}


def outcome(job) -> int:
    """The exit code of a job that has ended."""
    if job.status == "succeeded":
        return OK
    if job.status == "canceled":
        return CANCELED
    return GUARD_FAILED if job.error and job.error.code == "guard_failed" else JOB_FAILED


def _stage_of(job) -> str:
    return (TERMINAL_STAGE.get(job.status) or (job.stage if job.status == "running" else job.status))[:20]


def _follow(client, job_id: str, timeout: float | None):
    """A live progress bar (stage, %, ETA) on stderr until the job ends; the job at its end. Not on a terminal (a
    CI log): one line per stage instead."""
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    if not err.is_terminal:
        last: list[str] = []

        def log_stage(job) -> None:
            if _stage_of(job) not in last[-1:]:
                last.append(_stage_of(job))
                err.print(f"{job.id} {job.status} {_stage_of(job)} {job.progress:.0%}", highlight=False)

        return client.wait(job_id, timeout=timeout, on_progress=log_stage, max_interval=1.0)
    columns = (SpinnerColumn(), TextColumn("{task.fields[stage]:<20}"), BarColumn(), TaskProgressColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(job_id, total=1.0, stage="queued")

        def on_progress(job) -> None:
            progress.update(task, completed=job.progress, stage=_stage_of(job))

        return client.wait(job_id, timeout=timeout, on_progress=on_progress, max_interval=1.0)


def _check_recipe(client, recipe, model: str) -> None:
    """The server's verdict on the recipe (for the model's format when known) before anything is uploaded."""
    path = local_file(model)
    model_format = FORMAT_OF_SUFFIX.get(path.suffix.lower()) if path else client.get_model(model).format
    verdict = client.validate_recipe(recipe, model_format)
    if not verdict.valid:
        print_field_errors(verdict.errors)
        raise fail(INVALID, "invalid recipe (invalid_recipe); nothing was uploaded")


def read_report(client, job, downloaded: list[Path] = ()) -> dict | None:
    """The job's report.json: the downloaded copy, else fetched; None when the job has none."""
    copy = next((p for p in downloaded if p.name == "report.json"), None)
    if copy is not None:
        return json.loads(copy.read_text())
    return client.artifact_json(job.id) if any(a.name == "report.json" for a in job.artifacts) else None


def _report(client, job, output: Path | None, as_json: bool) -> None:
    paths = client.download_artifacts(job, output) if output is not None and job.artifacts else []
    if as_json:
        return dump({**job.model_dump(mode="json"), "downloaded": [str(p) for p in paths]})
    if job.error:
        err.print(Text.assemble((f"{job.error.code}:", "red"), " ", job.error.message), highlight=False)
    if job.metrics:
        print_results(console, job, read_report(client, job, paths))
    for p in paths:
        console.print(f"wrote {p}", highlight=False)


@http_command
def compress(ctx: typer.Context,
             model: str = typer.Argument(..., metavar="MODEL",
                                         help="A model id, or a file to upload first (.pt2, .onnx, .zip)."),
             recipe: str = typer.Option(..., "--recipe", "-r", help="A recipe file (YAML or JSON) or a preset name."),
             calibration: str = typer.Option(None, help="Calibration dataset: an id or a file to upload."),
             train: str = typer.Option(None, help="Training dataset (distill, finetune): an id or a file."),
             eval_: str = typer.Option(None, "--eval", help="Evaluation dataset (accuracy): an id or a file."),
             output: Path = typer.Option(None, "--output", "-o", help="Download the artifacts into this folder."),
             wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job to its end."),
             timeout: float = typer.Option(None, help="Stop waiting after this many seconds (exit 8)."),
             priority: int = typer.Option(None, min=0, max=9, help="0 (lowest) to 9 (highest; default: the "
                                                                  "server's, 5): waiting jobs with a higher one run "
                                                                  "first."),
             as_json: bool = JSON_OPTION) -> None:
    """Compress a model with a recipe; with --wait, follow it live, print the results and download them.

    The recipe is checked before anything is uploaded; a file the team already has (same SHA-256) is not sent
    again, and a file given for several datasets is sent once."""
    recipe_value = recipe_arg(recipe)
    with make_client(ctx) as client:
        _check_recipe(client, recipe_value, model)
        uploads = Uploads(client, quiet=as_json)
        model_id = uploads.resolve("models", model)
        datasets = {k: uploads.resolve("datasets", v)
                    for k, v in (("calibration", calibration), ("train", train), ("eval", eval_)) if v}
        job = client.create_job(model_id, recipe_value, priority=priority, **datasets)
        if not as_json:
            err.print(f"job {job.id} queued", highlight=False)
        if not wait:
            return dump(job) if as_json else console.print(job.id)
        try:
            job = client.wait(job.id, timeout=timeout) if as_json else _follow(client, job.id, timeout)
        except KeyboardInterrupt:
            err.print(f"stopped waiting; job {job.id} goes on (squeeze jobs cancel {job.id} to stop it)")
            raise typer.Exit(130) from None
        _report(client, job, output, as_json)
        raise typer.Exit(outcome(job))
