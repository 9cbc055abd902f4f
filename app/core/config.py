"""All settings, read once from the environment (prefix SQUEEZE_). Nothing else reads os.environ."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3
MiB = 1024**2


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SQUEEZE_", extra="ignore")

    data_dir: Path = Path("./.squeeze")
    # Empty means "derive from data_dir" (the embedded default: SQLite + filesystem broker + local blobs).
    database_url: str = ""
    broker_url: str = ""
    blob_url: str = ""
    # s3://bucket/prefix: blobs in an S3-compatible bucket (no shared disk between the API and workers).
    s3_endpoint_url: str | None = None  # e.g. http://minio:9000; empty: AWS
    s3_region: str | None = None
    s3_access_key_id: str | None = None  # empty: boto3's own chain (instance role, ~/.aws)
    s3_secret_access_key: str | None = None
    # Downloads answer 307 to a presigned URL instead of streaming through the API (clients must reach the bucket).
    s3_presigned_downloads: bool = False
    s3_presign_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # Multipart part size: memory per transfer stays near parts in flight x this (S3 needs >= 5 MiB parts).
    s3_multipart_chunk_bytes: int = Field(8 * MiB, ge=5 * MiB)
    bootstrap_admin_key: str | None = None
    bootstrap_admin_team: str = "admin"

    max_upload_bytes: int = Field(4 * GiB, gt=0)
    # Every other request body (JSON): bigger is a 413 before the body is read (app/core/security.py).
    max_body_bytes: int = Field(1 * MiB, gt=0)
    # Browser origins allowed to call the API cross-origin, comma-separated; empty (the default): CORS stays off.
    cors_origins: str = ""
    # Zip uploads: refuse archives that would inflate past this (zip bombs) or hold too many entries.
    max_unpacked_bytes: int = Field(16 * GiB, gt=0)
    max_zip_entries: int = Field(10_000, gt=0)
    # Screening an upload runs in a child process killed past this many seconds: the upload is refused (422
    # screening_timeout) and nothing is stored. Legitimate files take far less (a 512 MiB .npz: 0.4 s).
    screening_timeout_s: float = Field(60.0, gt=0)
    # The screening child's private memory (RLIMIT_DATA: heap and anonymous mappings; the upload it maps read-only
    # does not count): past it the upload gets 413 screening_memory. The largest legitimate need is a 64 MiB JSON
    # (a config or a .pt2 payload) parsed to Python objects.
    screening_memory_bytes: int = Field(1 * GiB, gt=0)
    # Uploads one API process screens at once; more wait their turn (their time budget starts when they run), so
    # that a burst of uploads cannot take every core and the memory of the host.
    screening_concurrency: int = Field(4, gt=0)

    job_timeout_s: float = Field(3600.0, gt=0)
    # The sandbox's address-space limit (RLIMIT_AS) scales with the job's models (the model file plus any teachers):
    # limit = min(max_bytes, max(memory_bytes, overhead_bytes + per_model_byte x model bytes)). memory_bytes is the
    # floor every job gets. Measured (python -m bench.run large): a job on a 2 GiB fp32 .pt2 (global magnitude prune,
    # .pt2 out) peaked at 11.3 GiB of address space (VmPeak), 5.2x the model above the 0.87 GiB a tiny job takes
    # (interpreter, torch, ONNX Runtime); the global prune step is the peak. 2 GiB + 6x gives it 14.0 GiB, 24% above.
    sandbox_memory_bytes: int = Field(8 * GiB, gt=0)
    sandbox_memory_overhead_bytes: int = Field(2 * GiB, ge=0)
    sandbox_memory_per_model_byte: float = Field(6.0, ge=0)
    # A job that would need more fails at once with `resource_limit` naming this setting, instead of being OOM-killed
    # half-way; never below memory_bytes. 32 GiB fits the largest default upload (4 GiB -> 26 GiB): set it to what
    # one job may take on the worker host (its RAM / worker_concurrency).
    sandbox_memory_max_bytes: int = Field(32 * GiB, gt=0)
    sandbox_file_bytes: int = Field(16 * GiB, gt=0)
    # Per job (its own uid): processes and threads; torch and ONNX Runtime start about two threads per core.
    sandbox_max_processes: int = Field(1024, gt=0)
    # A worker run as root gives each running job its own uid from this range (docs/security.md): the job's files,
    # its RLIMIT_NPROC and its signals are its own. The range needs no passwd entries; make it at least the number
    # of job slots on the host and keep it clear of real users. Slots are held by flock in sandbox_slot_dir.
    sandbox_uid_first: int = Field(200_000, ge=1000)
    sandbox_uid_count: int = Field(256, ge=1)
    sandbox_slot_dir: Path = Path("/run/squeeze/sandbox-uids")
    # Without bubblewrap the worker refuses to run model code. True lets it run with rlimits, an empty environment
    # and its own session only (no namespaces: host files, processes and network reachable): a single-user laptop.
    sandbox_allow_weak: bool = False
    # Where the host delegates cgroups (v2, or v1 per controller) each sandbox gets one: memory (replacing
    # RLIMIT_AS), processes (sandbox_max_processes) and CPU (sandbox_threads cores). False: rlimits only.
    sandbox_cgroups: bool = True
    # Sandboxes each worker process keeps started ahead of their job (interpreter up, torch and ONNX Runtime
    # imported), made while it runs no job; each runs one job only. 0: every job starts its own.
    sandbox_warm: int = Field(1, ge=0, le=8)
    # What one job's sandbox may make the supervisor store: events (count, bytes of message + data) and any one
    # protocol line (the result included). Past a cap the job fails with `sandbox_output_limit`.
    sandbox_max_events: int = Field(1000, ge=10)
    sandbox_max_event_bytes: int = Field(4 * MiB, ge=64 * 1024)
    sandbox_max_line_bytes: int = Field(4 * MiB, ge=64 * 1024)
    sandbox_threads: int = Field(0, ge=0)  # 0: all cores of the worker

    heartbeat_interval_s: float = Field(2.0, gt=0)
    # A running job whose heartbeat is older than this is presumed lost and requeued.
    heartbeat_timeout_s: float = Field(30.0, gt=0)
    # A queued job nobody claimed for this long is sent to the broker again.
    requeue_after_s: float = Field(60.0, gt=0)
    reaper_interval_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)

    # Resolved API keys are cached per process for this long (0: off); a revocation through this
    # process's API applies at once, one made elsewhere (another replica, the CLI) within the TTL.
    auth_cache_ttl_s: float = Field(5.0, ge=0)
    # GET /metrics shows every team's job counts: it needs an admin key, or this bearer token (a Prometheus
    # scraper's, which then needs no API key), at least 16 characters. Empty: admin keys only.
    metrics_token: str = Field("", pattern=r"^(|.{16,})$")

    queue_default: str = "cpu"
    # Jobs that train (finetune, distill) or ask for `device: cuda` go to this queue when it is set; GPU hosts run
    # a worker consuming it. Empty: every job goes to queue_default.
    queue_gpu: str = ""
    # The worker's device for training steps: auto = CUDA when torch sees it; cpu = never CUDA.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A sweep's grid may expand to at most this many points (one job each).
    sweep_max_points: int = Field(64, ge=1)
    worker_concurrency: int = Field(2, ge=1)
    # Fairness between teams. Each team_max_* / team_uploads_per_minute below is the server's default; an admin may
    # set a team's own value (PATCH /v1/teams/{team}/limits). 0: no limit (except team_max_priority).
    # At most this many running jobs per team; a worker that claims past it puts the job back on its queue for
    # team_defer_s and takes the next message (other teams' jobs start at once).
    team_max_running: int = Field(2, ge=0)
    # At most this many queued jobs per team: a submission past it (a sweep: all its points) is a 429.
    team_max_queued: int = Field(100, ge=0)
    # Bytes of uploaded models and datasets a team keeps stored (deleted ones free theirs): past it, a 429.
    team_max_upload_bytes: int = Field(50 * GiB, ge=0)
    # Uploads (models and datasets stored) per team in any 60 s: past it, a 429 with Retry-After.
    team_uploads_per_minute: int = Field(30, ge=0)
    # The highest job priority (0-9) a team may ask for: above it, a 422 naming the team's maximum.
    team_max_priority: int = Field(5, ge=0, le=9)
    team_defer_s: float = Field(2.0, gt=0)
    host: str = "127.0.0.1"
    port: int = 8000

    # Webhooks (docs/api.md#webhooks). Targets on private, loopback, link-local or otherwise non-public addresses are
    # refused unless their host, or a network holding their address, is listed here: comma-separated host names
    # or CIDRs, e.g. "hooks.internal,10.0.0.0/8".
    webhook_allowlist: str = ""
    webhook_timeout_s: float = Field(5.0, gt=0)
    # Attempts per delivery (the first included); a failed attempt waits base * 2**(attempt-1), capped.
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    webhook_retry_base_s: float = Field(10.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    # At most one `progress` delivery per job and target in this interval.
    webhook_progress_interval_s: float = Field(10.0, ge=0)
    # How often each API and worker process looks for due deliveries.
    webhook_poll_interval_s: float = Field(1.0, gt=0)
    webhook_max_per_team: int = Field(20, ge=1)

    # json: one JSON object per line (time, level, logger, message, request_id, job_id, ...); plain: for a terminal.
    log_format: Literal["json", "plain"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _derive_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'squeeze.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.blob_url:
            self.blob_url = f"file://{self.data_dir / 'blobs'}"
        return self

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def webhook_allowed(self) -> list[str]:
        return [item.strip() for item in self.webhook_allowlist.split(",") if item.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [item.strip() for item in self.cors_origins.split(",") if item.strip()]

    @property
    def threads(self) -> int:
        return self.sandbox_threads or (os.cpu_count() or 1)


@lru_cache
def get_settings() -> Settings:
    return Settings()


DEFAULT_SERVER_URL = "http://127.0.0.1:8000"


class ClientSettings(BaseSettings):
    """The client side (app/client.py, the `squeeze` commands that talk HTTP): which server, with which key.

    Read here rather than in the client so that settings stay in one module (docs/architecture.md, Conventions);
    none of the server's settings above apply to a client, and a client reads none of them.
    """

    model_config = SettingsConfigDict(env_prefix="SQUEEZE_", extra="ignore")

    url: str | None = None
    api_key: str | None = None
    config: Path | None = None  # SQUEEZE_CONFIG: the config file, instead of the default location
    xdg_config_home: Path | None = Field(None, validation_alias="XDG_CONFIG_HOME")

    def config_files(self) -> list[Path]:
        if self.config is not None:
            return [self.config.expanduser()]
        folder = (self.xdg_config_home or Path("~/.config")).expanduser() / "squeeze"
        return [folder / "config.toml", folder / "config.json"]


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None
    config_file: Path | None  # the file that was read, if any


def client_config(url: str | None = None, api_key: str | None = None) -> ClientConfig:
    """Explicit arguments win over SQUEEZE_URL / SQUEEZE_API_KEY, which win over the config file (`url`, `api_key`
    in SQUEEZE_CONFIG, else $XDG_CONFIG_HOME/squeeze/config.toml or config.json, XDG_CONFIG_HOME being ~/.config
    by default); the URL defaults to the embedded server's."""
    env = ClientSettings()
    from_file: dict = {}
    read: Path | None = None
    for path in env.config_files():
        if not path.is_file():
            if env.config is not None:
                raise ValueError(f"SQUEEZE_CONFIG names {path}, which is not a file")
            continue
        try:
            from_file = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML/JSON'}: {exc}") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"{path}: expected a table with url and api_key")
        read = path
        break
    resolved_url = url or env.url or from_file.get("url") or DEFAULT_SERVER_URL
    resolved_key = api_key or env.api_key or from_file.get("api_key") or None
    return ClientConfig(url=str(resolved_url).rstrip("/"), api_key=resolved_key, config_file=read)
