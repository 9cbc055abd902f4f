"""The `squeeze` command: run the server, manage API keys (on the server host), and, over HTTP through
app/client.py, upload models and datasets, compress, and follow jobs (from any machine or pipeline)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from app.config import get_settings
from app.models import DEFAULT_PRIORITY

EXIT_CODES = {
    0: "success",
    1: "other error (a server error, an unexpected answer)",
    2: "usage error (a bad option, a file that does not exist)",
    3: "invalid input: the server refused it (400/404/409/413/415/422), or a recipe file does not parse",
    4: "unauthorized: missing, wrong or revoked API key",
    5: "the job failed",
    6: "the job missed its guard (guard_failed; its artifacts are still downloaded)",
    7: "the job was canceled",
    8: "timed out waiting for the job (--timeout)",
    9: "the server is unreachable",
}
# "\b" keeps click from re-wrapping the paragraph that follows it.
EXIT_CODES_HELP = ("\b\nExit codes (for pipelines):\n" + "\n".join(f"  {c}  {w}" for c, w in EXIT_CODES.items())
                   + "\n\nServer and API key: --url/--api-key, else SQUEEZE_URL/SQUEEZE_API_KEY, else url/api_key in"
                   "\n~/.config/squeeze/config.toml or config.json (SQUEEZE_CONFIG names another file).")

cli = typer.Typer(help="Squeeze: a self-hosted model-compression server.", no_args_is_help=True,
                  epilog=EXIT_CODES_HELP, rich_markup_mode=None)
keys_cli = typer.Typer(help="API keys of teams (direct database access; run on the server host).",
                       no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
console = Console(soft_wrap=True)  # keys and URLs must stay copyable on one line


def migrate() -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(Path(__file__).resolve().parent.parent / "alembic.ini"))
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")


def _admin_key(data_dir: Path) -> str:
    """The bootstrap admin key: from the settings, else one generated once and kept in the data dir."""
    settings = get_settings()
    if settings.bootstrap_admin_key:
        return settings.bootstrap_admin_key
    path = data_dir / "admin_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("sqz_" + secrets.token_urlsafe(32))
    return path.read_text().strip()


@cli.command()
def server(host: str = typer.Option(None, help="Default: SQUEEZE_HOST (127.0.0.1)."),
           port: int = typer.Option(None, help="Default: SQUEEZE_PORT (8000)."),
           workers: int = typer.Option(1, help="Worker processes to start beside the API (0: none)."),
           ) -> None:
    """Migrate the database, then run the API and a local worker until Ctrl-C."""
    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate()
    key = _admin_key(settings.data_dir)
    env = {**os.environ, "SQUEEZE_BOOTSTRAP_ADMIN_KEY": key, "SQUEEZE_DATA_DIR": str(settings.data_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", host,
                               "--port", str(port), "--log-level", "warning"], env=env)]
    queues = ",".join(dict.fromkeys(q for q in (settings.queue_default, settings.queue_gpu) if q))
    for i in range(workers):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "threads",
             "-c", str(settings.worker_concurrency), "-Q", queues, "-n", f"worker{i}@%h",
             "--loglevel", "WARNING"], env=env))
    console.print(f"[bold green]Squeeze[/] on http://{host}:{port}  (data: {settings.data_dir})")
    console.print(f"admin key: [bold]{key}[/]   database: {settings.database_url.split('@')[-1]}")
    console.print(f"try: curl -H 'Authorization: Bearer {key}' http://{host}:{port}/v1/recipes/presets")
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [p.args[2] for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stopping:
        raise typer.Exit(1)


@cli.command("migrate")
def migrate_cmd() -> None:
    """Upgrade the database schema to the latest revision."""
    migrate()
    console.print("database at head")


@keys_cli.command("create")
def keys_create(team: str = typer.Option(..., help="Team name (created if new)."),
                name: str = typer.Option("default"), admin: bool = typer.Option(False)) -> None:
    """Create an API key; the key is printed once."""
    from app.auth import create_key
    from app.db import session_scope

    with session_scope() as db:
        row, key = create_key(db, team, name, is_admin=admin)
        ident = row.id
    console.print(f"key id {ident} for team {team}:")
    print(key)


@keys_cli.command("list")
def keys_list() -> None:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import ApiKey

    table = Table()
    for column in ("id", "team", "name", "prefix", "admin", "revoked"):
        table.add_column(column, no_wrap=column in ("id", "prefix"), overflow="fold")
    with session_scope() as db:
        for r in db.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            table.add_row(r.id, r.team.name, r.name, r.prefix, str(r.is_admin), str(r.revoked_at or ""))
    console.print(table)


@keys_cli.command("revoke")
def keys_revoke(key_id: str) -> None:
    from app.db import session_scope, utcnow
    from app.models import ApiKey

    with session_scope() as db:
        row = db.get(ApiKey, key_id)
        if row is None:
            console.print(f"[red]no key {key_id}[/]")
            raise typer.Exit(1)
        row.revoked_at = row.revoked_at or utcnow()
    console.print(f"revoked {key_id}")


# -- over HTTP, through app/client.py -------------------------------------------------------------------------------

models_cli = typer.Typer(help="Uploaded models of your team.", no_args_is_help=True)
datasets_cli = typer.Typer(help="Uploaded datasets of your team (.npz / .safetensors arrays).", no_args_is_help=True)
jobs_cli = typer.Typer(help="Compression jobs of your team.", no_args_is_help=True)
recipes_cli = typer.Typer(help="Recipe presets and validation.", no_args_is_help=True)
cli.add_typer(models_cli, name="models")
cli.add_typer(datasets_cli, name="datasets")
cli.add_typer(jobs_cli, name="jobs")
cli.add_typer(recipes_cli, name="recipes")
err = Console(stderr=True, soft_wrap=True)  # progress and messages; stdout carries results (and --json)

OK, ERROR, USAGE, INVALID, UNAUTHORIZED, JOB_FAILED, GUARD_FAILED, CANCELED, TIMEOUT, UNREACHABLE = range(10)
TERMINAL_STAGE = {"succeeded": "done", "failed": "failed", "canceled": "canceled"}


@cli.callback()
def _root(ctx: typer.Context,
          url: str = typer.Option(None, "--url", help="Server URL (else SQUEEZE_URL, the config file, "
                                                       "http://127.0.0.1:8000)."),
          api_key: str = typer.Option(None, "--api-key", help="API key (else SQUEEZE_API_KEY, the config file).")
          ) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


def _client(ctx: typer.Context):
    from app.client import Client

    opts = ctx.find_root().obj or {}
    try:
        return Client(opts.get("url"), opts.get("api_key"))
    except ValueError as exc:  # a config file that does not parse
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(USAGE) from None


def _fail(code: int, message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def http_command(fn):
    """Maps the client's errors to the documented exit codes, with the server's message on stderr."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from app.client import ServerError, SqueezeError, Unauthorized, Unreachable, WaitTimeout

        try:
            return fn(*args, **kwargs)
        except Unreachable as exc:
            raise _fail(UNREACHABLE, exc.message) from None
        except SqueezeError as exc:
            for e in exc.field_errors:
                err.print(f"  {e.get('field')}: {e.get('message')}", highlight=False)
            code = UNAUTHORIZED if isinstance(exc, Unauthorized) else (
                ERROR if isinstance(exc, ServerError) or exc.status == 0 else INVALID)
            raise _fail(code, f"{exc.message} ({exc.code}, HTTP {exc.status})") from None
        except WaitTimeout as exc:
            raise _fail(TIMEOUT, f"{exc}; it goes on on the server (squeeze jobs cancel {exc.job.id} to stop it)")

    return run


def _dump(value) -> None:
    """--json: one JSON document on stdout."""
    import json

    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    print(json.dumps(value, indent=2, default=str))


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v, fmt: str = "{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def _looks_like_path(value: str) -> bool:
    # Ids are `<prefix>_<hex>`: a slash or a dot means the user meant a file.
    return "/" in value or os.sep in value or "." in value


def _id_or_upload(client, kind: str, value: str, quiet: bool) -> str:
    """An id, or a local file uploaded first (its new id)."""
    path = Path(value).expanduser()
    if path.is_file():
        row = client.upload_model(path) if kind == "models" else client.upload_dataset(path)
        if not quiet:
            err.print(f"uploaded {path.name} ({_size(row.size_bytes)}, {row.format}) as {row.id}", highlight=False)
        return row.id
    if path.exists() or _looks_like_path(value):
        raise _fail(USAGE, f"{value}: no such file" + (" (a folder: zip it first)" if path.is_dir() else ""))
    return value


def _recipe_arg(value: str):
    """A recipe file (YAML or JSON) -> its object; anything else is a preset name for the server to resolve."""
    import json

    import yaml

    path = Path(value).expanduser()
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml", ".json") or "/" in value or path.exists():
            raise _fail(USAGE, f"{value}: no such recipe file")
        return value
    try:
        text = path.read_text()
        recipe = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _fail(INVALID, f"{value}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}")
    if not isinstance(recipe, dict):
        raise _fail(INVALID, f"{value}: a recipe is a mapping (steps, outputs, evaluate, guard), not "
                             f"{type(recipe).__name__}")
    return recipe


def _outcome(job) -> int:
    if job.status == "succeeded":
        return OK
    if job.status == "canceled":
        return CANCELED
    return GUARD_FAILED if job.error and job.error.code == "guard_failed" else JOB_FAILED


def _file_table(rows) -> Table:
    table = Table()
    for column in ("id", "name", "format", "size", "created"):
        table.add_column(column, no_wrap=column == "id", overflow="fold")
    for r in rows:
        table.add_row(r.id, r.name, r.format, _size(r.size_bytes), f"{r.created_at:%Y-%m-%d %H:%M}")
    return table


def _jobs_table(rows) -> Table:
    table = Table()
    for column in ("id", "status", "progress", "stage", "model", "created", "error"):
        table.add_column(column, no_wrap=column in ("id", "model"), overflow="fold")
    for j in rows:
        table.add_row(j.id, j.status, f"{j.progress:.0%}", j.stage or "", j.model_id,
                      f"{j.created_at:%Y-%m-%d %H:%M}", j.error.code if j.error else "")
    return table


def results_table(job) -> Table:
    """The measured figures of a job: original vs result, per runtime and batch size, and the guard's verdict."""
    m = job.metrics or {}
    orig, comp, ratios = m.get("original") or {}, m.get("compressed") or {}, m.get("ratios") or {}
    table = Table(title=f"job {job.id}: {job.status}" + (f" ({job.error.code})" if job.error else ""))
    for column in ("", "original", "compressed", "change"):
        table.add_column(column, justify="left" if not column else "right")

    def ratio(v) -> str:
        return "-" if v is None else f"{v:.2f}x"

    table.add_row("size", _size(orig.get("size_bytes")), _size(comp.get("size_bytes")), ratio(ratios.get("size")))
    if comp.get("safetensors_size_bytes"):
        table.add_row("size (safetensors)", "", _size(comp["safetensors_size_bytes"]),
                      ratio(ratios.get("safetensors_size")))
    table.add_row("params (nonzero)", _num(orig.get("nonzero_params"), "{:,}"),
                  _num(comp.get("nonzero_params"), "{:,}"),
                  ratio(ratios.get("nonzero_params")))
    table.add_row("sparsity", _num(orig.get("sparsity"), "{:.1%}"), _num(comp.get("sparsity"), "{:.1%}"), "")
    table.add_row("MACs", _num(orig.get("macs"), "{:,}"), _num(comp.get("macs"), "{:,}"), ratio(ratios.get("macs")))
    for runtime, by_batch in (ratios.get("latency") or {}).items():
        for batch, speedup in sorted(by_batch.items(), key=lambda kv: int(kv[0])):
            before = ((orig.get("latency_ms") or {}).get(runtime) or {}).get(batch) or {}
            after = ((comp.get("latency_ms") or {}).get(runtime) or {}).get(batch) or {}
            table.add_row(f"latency {runtime} b{batch}", _num(before.get("median"), "{:.3f} ms"),
                          _num(after.get("median"), "{:.3f} ms"), f"{speedup:.2f}x speed-up" if speedup else "-")
    drop = ratios.get("accuracy_drop")
    table.add_row("accuracy", _num(orig.get("accuracy"), "{:.2%}"), _num(comp.get("accuracy"), "{:.2%}"),
                  "-" if drop is None else f"{-drop * 100:+.2f} pt")
    table.add_row("agreement", "", _num(comp.get("agreement"), "{:.2%}"), "")
    if m.get("flags"):
        table.add_row("flags", "", ", ".join(m["flags"]), "")
    guard = m.get("guard")
    if guard is not None:
        table.add_row("guard", "", "[green]passed[/]" if guard["passed"] else "[red]failed[/]", "")
        for c in guard["checks"]:
            mark = "ok" if c["passed"] else "missed"
            table.add_row(f"  {c['bound']}", f"limit {c['limit']}", _num(c.get("measured")), mark)
    return table


def _print_job(job) -> None:
    console.print(f"job [bold]{job.id}[/]  status {job.status}  progress {job.progress:.0%}  stage {job.stage or '-'}",
                  highlight=False)
    if job.error:
        console.print(f"error {job.error.code}: {job.error.message}", highlight=False)
    if job.metrics:
        console.print(results_table(job))
    for a in job.artifacts:
        console.print(f"  artifact {a.name}  {a.format}  {_size(a.size_bytes)}" + (f"  [{a.label}]" if a.label else ""),
                      highlight=False)


def _follow(client, job_id: str, timeout: float | None):
    """A live progress bar (stage, %, ETA) on stderr until the job ends; the job at its end."""
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (SpinnerColumn(), TextColumn("{task.fields[stage]:<20}"), BarColumn(), TaskProgressColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn())
    def stage_of(job) -> str:
        return (TERMINAL_STAGE.get(job.status) or (job.stage if job.status == "running" else None) or job.status)[:20]

    if not err.is_terminal:  # a CI log: one line per stage rather than a redrawn bar
        last: list[str] = []

        def log_stage(job) -> None:
            if stage_of(job) not in last[-1:]:
                last.append(stage_of(job))
                err.print(f"{job.id} {job.status} {stage_of(job)} {job.progress:.0%}", highlight=False)

        return client.wait(job_id, timeout=timeout, on_progress=log_stage, max_interval=1.0)
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(job_id, total=1.0, stage="queued")

        def on_progress(job) -> None:
            progress.update(task, completed=job.progress, stage=stage_of(job))

        return client.wait(job_id, timeout=timeout, on_progress=on_progress, max_interval=1.0)


@cli.command()
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
             priority: int = typer.Option(DEFAULT_PRIORITY, min=0, max=9,
                                          help="0 (lowest) to 9 (highest): waiting jobs with a higher one run first."),
             as_json: bool = typer.Option(False, "--json", help="Print the job as JSON (no progress bar)."),
             ) -> None:
    """Compress a model with a recipe; with --wait, follow it live, print the results and download them."""
    recipe_value = _recipe_arg(recipe)
    with _client(ctx) as client:
        model_id = _id_or_upload(client, "models", model, as_json)
        datasets = {k: _id_or_upload(client, "datasets", v, as_json)
                    for k, v in (("calibration", calibration), ("train", train), ("eval", eval_)) if v}
        job = client.create_job(model_id, recipe_value, priority=priority, **datasets)
        if not as_json:
            err.print(f"job {job.id} queued", highlight=False)
        if not wait:
            if as_json:
                _dump(job)
            else:
                console.print(job.id)
            return
        try:
            job = client.wait(job.id, timeout=timeout) if as_json else _follow(client, job.id, timeout)
        except KeyboardInterrupt:
            err.print(f"stopped waiting; job {job.id} goes on (squeeze jobs cancel {job.id} to stop it)")
            raise typer.Exit(130) from None
        paths = client.download_artifacts(job, output) if output is not None and job.artifacts else []
        if as_json:
            _dump({**job.model_dump(mode="json"), "downloaded": [str(p) for p in paths]})
        else:
            if job.error:
                err.print(f"[red]{job.error.code}:[/] {job.error.message}", highlight=False)
            if job.metrics:
                console.print(results_table(job))
            for p in paths:
                console.print(f"wrote {p}", highlight=False)
        raise typer.Exit(_outcome(job))


def _file_commands(group: typer.Typer, kind: str) -> None:
    """upload / list / show / download / delete, the same for models and datasets."""
    one = kind[:-1]

    @group.command("upload")
    @http_command
    def upload(ctx: typer.Context, path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
               name: str = typer.Option(None, help="Name to keep (default: the file name)."),
               as_json: bool = typer.Option(False, "--json")) -> None:
        with _client(ctx) as client:
            row = client.upload_model(path, name) if kind == "models" else client.upload_dataset(path, name)
        if as_json:
            return _dump(row)
        console.print(f"{row.id}  {row.name}  {row.format}  {_size(row.size_bytes)}", highlight=False)

    upload.__doc__ = f"Upload a {one} (streamed; prints its id)."

    @group.command("list")
    @http_command
    def list_(ctx: typer.Context, limit: int = typer.Option(50, min=1, max=200),
              as_json: bool = typer.Option(False, "--json")) -> None:
        with _client(ctx) as client:
            page = client.list_models(limit) if kind == "models" else client.list_datasets(limit)
        if as_json:
            return _dump(page)
        console.print(_file_table(page.data))

    list_.__doc__ = f"List your team's {kind}, newest first."

    @group.command("show")
    @http_command
    def show(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID"),
             as_json: bool = typer.Option(False, "--json")) -> None:
        with _client(ctx) as client:
            row = client.get_model(ident) if kind == "models" else client.get_dataset(ident)
        if as_json:
            return _dump(row)
        console.print(_file_table([row]))
        if row.details:
            console.print_json(data=row.details)

    show.__doc__ = f"Show one {one} and what the server read from it."

    @group.command("download")
    @http_command
    def download(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID"),
                 output: Path = typer.Option(Path("."), "--output", "-o", help="A file, or a folder to write into.")
                 ) -> None:
        with _client(ctx) as client:
            path = client.download_model(ident, output) if kind == "models" else client.download_dataset(ident, output)
        console.print(f"wrote {path}", highlight=False)

    download.__doc__ = f"Download a {one} (checked against its SHA-256)."

    @group.command("delete")
    @http_command
    def delete(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID")) -> None:
        with _client(ctx) as client:
            client.delete_model(ident) if kind == "models" else client.delete_dataset(ident)
        console.print(f"deleted {ident}", highlight=False)

    delete.__doc__ = f"Delete a {one}."


_file_commands(models_cli, "models")
_file_commands(datasets_cli, "datasets")


@jobs_cli.command("list")
@http_command
def jobs_list(ctx: typer.Context,
              status: str = typer.Option(None, help="queued, running, succeeded, failed, canceling or canceled."),
              model: str = typer.Option(None, help="Only this model's jobs."),
              limit: int = typer.Option(50, min=1, max=200), as_json: bool = typer.Option(False, "--json")) -> None:
    """List your team's jobs, newest first."""
    with _client(ctx) as client:
        page = client.list_jobs(status=status, model_id=model, limit=limit)
    if as_json:
        return _dump(page)
    console.print(_jobs_table(page.data))


@jobs_cli.command("show")
@http_command
def jobs_show(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """A job: status, error, measured results and artifacts."""
    with _client(ctx) as client:
        job = client.get_job(job_id)
    if as_json:
        return _dump(job)
    _print_job(job)


@jobs_cli.command("cancel")
@http_command
def jobs_cancel(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Cancel a job (a running one is stopped: its sandbox is killed)."""
    with _client(ctx) as client:
        job = client.cancel_job(job_id)
    if as_json:
        return _dump(job)
    console.print(f"{job.id} {job.status}", highlight=False)


@jobs_cli.command("delete")
@http_command
def jobs_delete(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Delete a finished job with its events and artifacts (cancel a queued or running one first)."""
    with _client(ctx) as client:
        client.delete_job(job_id)
    console.print(f"deleted {job_id}", highlight=False)


@jobs_cli.command("logs")
@http_command
def jobs_logs(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
              follow: bool = typer.Option(False, "--follow", "-f",
                                          help="Stream new events until the job ends; exit with its outcome code."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """A job's events (queued, started, stage, step, succeeded, ...)."""
    with _client(ctx) as client:
        events = client.stream_events(job_id) if follow else client.events(job_id)
        for e in events:
            if as_json:
                print(e.model_dump_json(), flush=True)
            else:
                console.print(f"{e.created_at:%H:%M:%S} {e.id:>5} {e.type:<12} {e.message or ''}", highlight=False)
        if follow:
            raise typer.Exit(_outcome(client.get_job(job_id)))


@recipes_cli.command("presets")
@http_command
def recipes_presets(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """The named recipes the server knows."""
    with _client(ctx) as client:
        presets = client.presets()
    if as_json:
        return _dump(presets)
    table = Table()
    table.add_column("preset", no_wrap=True)
    table.add_column("description")
    for p in presets:
        table.add_row(p["name"], p["description"])
    console.print(table)


@recipes_cli.command("validate")
@http_command
def recipes_validate(ctx: typer.Context,
                     recipe: str = typer.Argument(..., help="A recipe file (YAML or JSON) or a preset name."),
                     model_format: str = typer.Option(None, "--format", help="Check the outputs against this input "
                                                                              "format: pt2, onnx, package or hf."),
                     as_json: bool = typer.Option(False, "--json")) -> None:
    """Check a recipe with the server; exit 3 naming each bad field when it would be refused."""
    with _client(ctx) as client:
        result = client.validate_recipe(_recipe_arg(recipe), model_format)
    if as_json:
        _dump(result)
    elif result.valid:
        console.print(f"valid; outputs: {', '.join(result.outputs or []) or 'the input format'}", highlight=False)
    for e in result.errors:
        err.print(f"  {e.get('field')}: {e.get('message')}", highlight=False)
    if not result.valid:
        raise _fail(INVALID, "invalid recipe")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
