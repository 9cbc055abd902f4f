"""A real Squeeze stack for tests and benchmarks: fresh databases, an API server and Celery workers."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

PG_ADMIN_URL = os.environ.get("SQUEEZE_TEST_PG", "postgresql://127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_KEY = "sqz_test_admin_" + secrets.token_hex(8)
ROOT = Path(__file__).resolve().parent.parent
SETTINGS_ENV = ("SQUEEZE_DATA_DIR", "SQUEEZE_DATABASE_URL", "SQUEEZE_BROKER_URL", "SQUEEZE_BLOB_URL",
                "SQUEEZE_BOOTSTRAP_ADMIN_KEY", "SQUEEZE_HEARTBEAT_TIMEOUT_S", "SQUEEZE_HEARTBEAT_INTERVAL_S",
                "SQUEEZE_REQUEUE_AFTER_S", "SQUEEZE_REAPER_INTERVAL_S", "SQUEEZE_MAX_UPLOAD_BYTES")


class ServiceUnavailable(RuntimeError):
    pass


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _need(service: str, host: str, port: int) -> None:
    if not _port_open(host, port):
        raise ServiceUnavailable(f"{service} at {host}:{port} unreachable")


_redis_dbs = iter(range(1, 16))


@dataclass
class Backend:
    name: str
    database_url: str
    broker_url: str
    cleanup: list = field(default_factory=list)


def make_backend(name: str, data_dir: Path, *, pg_admin_url: str = PG_ADMIN_URL,
                 broker_url: str | None = None) -> Backend:
    """A fresh database (and Redis db) for one stack. `pg_admin_url` and `broker_url` point a postgres backend at
    other servers than the shared ones (a private PostgreSQL or Redis a test may stop and restart)."""
    if name == "sqlite":
        return Backend(name, f"sqlite:///{data_dir / 'squeeze.db'}", "filesystem://")
    pg = urlparse(pg_admin_url)
    _need("PostgreSQL", pg.hostname or "127.0.0.1", pg.port or 5432)
    if broker_url is None:
        _need("Redis", REDIS_HOST, REDIS_PORT)
    import psycopg
    import redis

    db_name = "squeeze_t_" + secrets.token_hex(6)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')

    def drop() -> None:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    if broker_url is None:
        redis_db = next(_redis_dbs, 15)
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db).flushdb()
        broker_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
    base = pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return Backend(name, f"{base}/{db_name}", broker_url, [drop])


class PrivateRedis:
    """A redis-server of the caller's own on a free port, without persistence (`--save "" --appendonly no`):
    killing it loses every queued message, as a broker restart with its data lost would."""

    def __init__(self, log_dir: Path):
        self.port, self.log_dir = free_port(), log_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise ServiceUnavailable("redis-server is not on PATH")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=open(self.log_dir / f"redis-{self.port}.log", "ab"), stderr=subprocess.STDOUT)
        _wait_port("Redis", "127.0.0.1", self.port, self.proc)

    def kill(self) -> None:
        """kill -9: whatever it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PrivatePostgres:
    """A PostgreSQL cluster of the caller's own (initdb in a temp dir, trust auth, a free port, its unix socket
    in that dir), run as the `postgres` user through runuser, so a test may stop and restart it. Needs root."""

    def __init__(self, bin_dir: Path | None = None):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        self.bin_dir = bin_dir or (found[-1].parent if found else None)
        if self.bin_dir is None or not (self.bin_dir / "initdb").exists():
            raise ServiceUnavailable("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        if os.geteuid() != 0:
            raise ServiceUnavailable("a private PostgreSQL cluster needs root (to run it as the postgres user)")
        import pwd

        self.user = pwd.getpwnam("postgres")
        # Not under pytest's tmp_path: that is 0700 root, which the postgres user cannot enter.
        self.dir = Path(tempfile.mkdtemp(prefix="squeeze-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._pg("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin_dir / tool), *args], check=True,
                       capture_output=True, cwd=self.dir)

    def start(self) -> None:
        # fsync off: a test cluster; an immediate stop is a crash of the server, not of the machine.
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o", options,
                 "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_port(service: str, host: str, port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise ServiceUnavailable(f"{service} did not start on {host}:{port}")


def backend_env(backend: Backend, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {"SQUEEZE_DATA_DIR": str(data_dir), "SQUEEZE_DATABASE_URL": backend.database_url,
           "SQUEEZE_BROKER_URL": backend.broker_url, "SQUEEZE_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY}
    env.update(extra)
    return env


def reset_caches() -> None:
    from app.core import auth, config, db
    from app.queue import broker

    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    db.get_read_sessionmaker.cache_clear()
    auth._cache.clear()
    broker._sender.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A real API server (uvicorn) and real Celery worker processes on a backend."""

    def __init__(self, backend: Backend, data_dir: Path, log_dir: Path, **settings: str):
        self.backend, self.data_dir, self.log_dir = backend, data_dir, log_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SQUEEZE_")}
        self.env.update(backend_env(backend, data_dir, **settings))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_proc: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def _log(self, name: str):
        return open(self.log_dir / f"{name}.log", "ab")

    def start_api(self, processes: int = 1) -> None:
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=self.env, check=True, cwd=ROOT,
                       capture_output=True)
        self.api_proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--workers", str(processes)], env=self.env, cwd=ROOT,
            stdout=self._log("api"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api_proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"API did not start; see {self.log_dir / 'api.log'}")

    def start_worker(self, concurrency: int = 2, queues: str = "cpu",
                     env_overrides: dict[str, str] | None = None) -> subprocess.Popen:
        """A Celery worker named `w<n>-<hex>@host`; `env_overrides` (e.g. its own SQUEEZE_DATA_DIR) apply to it only."""
        n = len(self.workers)
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "threads", "-c",
             str(concurrency), "-Q", queues, "-n", f"w{n}-{secrets.token_hex(3)}@%h", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle"],
            env={**self.env, **(env_overrides or {})}, cwd=ROOT, stdout=self._log(f"worker{n}"),
            stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        return proc

    def kill_worker_tree(self, proc: subprocess.Popen) -> None:
        """kill -9 of the worker and everything under it (its sandboxes included)."""
        import psutil

        try:
            parent = psutil.Process(proc.pid)
            tree = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        psutil.wait_procs(tree, timeout=10)  # SIGKILL is delivered, not yet done: a killed bwrap still showed running

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def diagnostics(self, lines: int = 15) -> str:
        """Each process's state and the tail of its log: printed when a test on this stack fails, so a worker that
        died (its exit code) is told apart from one that is alive but stuck."""
        parts = []
        for name, proc in [("api", self.api_proc), *((f"worker{n}", w) for n, w in enumerate(self.workers))]:
            if proc is None:
                continue
            state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
            log = self.log_dir / f"{name}.log"
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"--- {name} (pid {proc.pid}) {state}; {log}:\n" + "\n".join(t[:400] for t in tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stops the API and workers, then drops the stack's databases."""
        for p in [*self.workers, self.api_proc]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [*self.workers, self.api_proc]:
            if p is None:
                continue
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_worker_tree(p)
        self.admin.close()
        for drop in self.backend.cleanup:
            drop()
        self.backend.cleanup.clear()




TERMINAL = ("succeeded", "failed", "canceled")


def wait_for(client: httpx.Client, job_id: str, until=lambda job: job["status"] in TERMINAL,
             timeout: float = 240, interval: float = 0.2) -> dict:
    """Polls GET /v1/jobs/{id} until `until(job)`; TimeoutError (with the last job seen) past `timeout`."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(interval)
    raise TimeoutError(f"job {job_id} did not reach the condition in {timeout}s: {job}")
