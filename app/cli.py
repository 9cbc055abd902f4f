"""The server side of the `squeeze` command: `squeeze server`, `squeeze migrate` and `squeeze keys` run these on the
server host (direct database access). The command itself is squeeze_client.cli (the client package, client/), which
imports this module only for those commands; `python -m app.cli ...` runs the whole command."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.core.config import Settings, get_settings


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


def _start(settings: Settings, host: str, port: int, workers: int, key: str) -> list[subprocess.Popen]:
    """The API (uvicorn) and `workers` Celery workers, as child processes."""
    env = {**os.environ, "SQUEEZE_BOOTSTRAP_ADMIN_KEY": key, "SQUEEZE_DATA_DIR": str(settings.data_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", host,
                               "--port", str(port), "--log-level", "warning"], env=env)]
    queues = ",".join(dict.fromkeys(q for q in (settings.queue_default, settings.queue_gpu) if q))
    for i in range(workers):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "threads",
             "-c", str(settings.worker_concurrency), "-Q", queues, "-n", f"worker{i}@%h",
             "--loglevel", "WARNING"], env=env))
    return procs


def _run_until_stopped(procs: list[subprocess.Popen]) -> bool:
    """Waits for Ctrl-C / SIGTERM or a child's exit, then stops them all; whether a signal stopped it."""
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
    return stopping


def _command_hint() -> str:
    """How to run `squeeze` from another shell: `make run` starts it from the venv, which that shell may not have on
    its PATH."""
    here = Path(sys.executable).parent / "squeeze"
    on_path = shutil.which("squeeze")
    if on_path and Path(on_path).resolve() == here.resolve():
        return "the squeeze command: squeeze --help"
    return (f"the squeeze command: {here} (not on PATH: source {here.parent / 'activate'}, or export "
            f"PATH={here.parent}:$PATH)")


def serve(host: str | None, port: int | None, workers: int) -> int:
    """Migrates the database, then runs the API and `workers` local workers until Ctrl-C; the exit code (1 when a
    child process failed on its own)."""
    from rich.console import Console

    console = Console(soft_wrap=True)  # the key and the URL stay copyable on one line
    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate()
    key = _admin_key(settings.data_dir)
    procs = _start(settings, host, port, workers, key)
    url = f"http://{host}:{port}"
    console.print(f"[bold green]Squeeze[/] on {url}  (data: {settings.data_dir}; port: --port or SQUEEZE_PORT)")
    console.print(f"admin key: [bold]{key}[/]   database: {settings.database_url.split('@')[-1]}")
    console.print(f"dashboard: {url}/dashboard   API reference: {url}/docs")
    console.print(f"try: curl -H 'Authorization: Bearer {key}' {url}/v1/recipes/presets")
    console.print(_command_hint(), highlight=False)
    stopped = _run_until_stopped(procs)
    failed = [p for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed and not stopped else 0


def create_key(team: str, name: str, admin: bool) -> dict[str, str]:
    """A new API key of `team` (created if new): {id, team, key}; the key is shown only this once."""
    from app.core.auth import create_key as create
    from app.core.db import session_scope

    with session_scope() as db:
        row, key = create(db, team, name, is_admin=admin)
        return {"id": row.id, "team": team, "key": key}


def list_keys() -> list[dict[str, object]]:
    """Every API key (never the secret), oldest first."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.core.tables import ApiKey

    with session_scope() as db:
        return [{"id": r.id, "team": r.team.name, "name": r.name, "prefix": r.prefix, "admin": r.is_admin,
                 "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None}
                for r in db.scalars(select(ApiKey).order_by(ApiKey.created_at))]


def revoke_key(key_id: str) -> bool:
    """Revokes the key (a revoked one stays revoked); False when there is no such key."""
    from app.core.db import session_scope, utcnow
    from app.core.tables import ApiKey

    with session_scope() as db:
        row = db.get(ApiKey, key_id)
        if row is None:
            return False
        row.revoked_at = row.revoked_at or utcnow()
    return True


def main() -> None:
    from squeeze_client.cli import main as squeeze

    squeeze()


if __name__ == "__main__":
    main()
