"""`squeeze jobs ...`: list, show, cancel, delete, logs."""

from __future__ import annotations

import typer
from rich.text import Text

from squeeze_client.cli.common import JSON_OPTION, WIDE_OPTION, console, dump, http_command, make_client, size
from squeeze_client.cli.compress import outcome, read_report
from squeeze_client.cli.summary import print_results
from squeeze_client.cli.tables import jobs_table, print_table

jobs = typer.Typer(help="Compression jobs of your team.", no_args_is_help=True)


@jobs.command("list")
@http_command
def jobs_list(ctx: typer.Context,
              status: str = typer.Option(None, help="queued, running, succeeded, failed, canceling or canceled."),
              model: str = typer.Option(None, help="Only this model's jobs."),
              limit: int = typer.Option(50, min=1, max=200), wide: bool = WIDE_OPTION,
              as_json: bool = JSON_OPTION) -> None:
    """List your team's jobs, newest first (80 columns; --wide for the model, priority and error message)."""
    with make_client(ctx) as client:
        page = client.list_jobs(status=status, model_id=model, limit=limit)
    if as_json:
        return dump(page)
    print_table(console, jobs_table(page.data, wide), wide)


def _print_job(job, report: dict | None) -> None:
    console.print(Text.assemble("job ", (job.id, "bold"), f"  status {job.status}  progress {job.progress:.0%}  "
                                                       f"stage {job.stage}"), highlight=False)
    if job.error:
        console.print(f"error {job.error.code}: {job.error.message}", highlight=False)
    if job.metrics:
        print_results(console, job, report)
    for a in job.artifacts:
        console.print(f"  artifact {a.name}  {a.format}  {size(a.size_bytes)}" + (f"  [{a.label}]" if a.label else ""),
                      highlight=False)


@jobs.command("show")
@http_command
def jobs_show(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JSON_OPTION) -> None:
    """A job: status, error, measured results (with the report's flags) and artifacts."""
    with make_client(ctx) as client:
        job = client.get_job(job_id)
        if as_json:
            return dump(job)
        _print_job(job, read_report(client, job) if job.metrics else None)


@jobs.command("cancel")
@http_command
def jobs_cancel(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
                as_json: bool = JSON_OPTION) -> None:
    """Cancel a job (a running one is stopped: its sandbox is killed)."""
    with make_client(ctx) as client:
        job = client.cancel_job(job_id)
    if as_json:
        return dump(job)
    console.print(f"{job.id} {job.status}", highlight=False)


@jobs.command("delete")
@http_command
def jobs_delete(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
                as_json: bool = JSON_OPTION) -> None:
    """Delete a finished job with its events and artifacts (cancel a queued or running one first)."""
    with make_client(ctx) as client:
        client.delete_job(job_id)
    if as_json:
        return dump({"id": job_id, "deleted": True})
    console.print(f"deleted {job_id}", highlight=False)


@jobs.command("logs")
@http_command
def jobs_logs(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
              follow: bool = typer.Option(False, "--follow", "-f",
                                          help="Stream new events until the job ends; exit with its outcome code."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """A job's events (queued, started, stage, step, succeeded, ...)."""
    with make_client(ctx) as client:
        events = client.stream_events(job_id) if follow else client.events(job_id)
        for e in events:
            if as_json:
                print(e.model_dump_json(), flush=True)
            else:
                console.print(f"{e.created_at:%H:%M:%S} {e.id:>5} {e.type:<12} {e.message}", highlight=False)
        if follow:
            raise typer.Exit(outcome(client.get_job(job_id)))
