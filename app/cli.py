"""The `squeeze` command: run the server on the embedded default, and manage API keys."""

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

cli = typer.Typer(help="Squeeze: a self-hosted model-compression server.", no_args_is_help=True)
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
