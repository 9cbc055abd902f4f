"""Python client of the Squeeze HTTP API (v1), used by the `squeeze` command and by pipelines.

    from squeeze_client import Client

    with Client() as sq:                       # SQUEEZE_URL / SQUEEZE_API_KEY or ~/.config/squeeze/config.toml
        model = sq.upload_model("model.pt2", reuse=True)   # reuse: no second copy of the same bytes
        data = sq.upload_dataset("eval.npz", reuse=True)
        job = sq.create_job(model.id, "prune-50", eval=data.id)
        job = sq.wait(job.id, timeout=3600, on_progress=lambda j: print(j.stage, f"{j.progress:.0%}"))
        sq.download_artifacts(job, "out/")

httpx only (no torch, nothing of the server): uploads stream from the file, downloads stream to disk, so neither
holds a model in memory. Every error answer of the server raises a SqueezeError subclass carrying its `code`,
`message` and `details`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from squeeze_client.config import client_config
from squeeze_client.errors import Unreachable, WaitTimeout, raise_for
from squeeze_client.transport import file_chunks, file_sha256, params, save_checked, sse, stream_size
from squeeze_client.wire import (Comparison, EventOut, FileOut, FilePage, JobOut, JobPage, KeyCreated, KeyOut,
                                 RecipeValidation, SweepOut, SweepPage)

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
Source = str | os.PathLike | BinaryIO


class Client:
    """One Squeeze server and API key. `url`/`api_key` default to SQUEEZE_URL/SQUEEZE_API_KEY, then the config
    file (see squeeze_client.config). `http` injects a ready httpx.Client (tests pass FastAPI's TestClient); its
    base URL and headers are then used as they are unless url/api_key are given."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 http: httpx.Client | None = None):
        if http is None:
            cfg = client_config(url, api_key)
            self.url, self.api_key = cfg.url, cfg.api_key
            self._http = httpx.Client(base_url=self.url, timeout=timeout)
            self._owned = True
        else:
            self._http, self._owned = http, False
            self.url = url or str(http.base_url).rstrip("/")
            self.api_key = api_key
        # Sent with each request rather than set on the httpx client, so an injected client is left as it was.
        self._auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.timeout = timeout

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------------------

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        return Unreachable(self.url, str(exc) or type(exc).__name__)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        kwargs["headers"] = {**self._auth, **(kwargs.get("headers") or {})}
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _upload(self, kind: str, source: Source, name: str | None, reuse: bool) -> FileOut:
        """Streams the body from the file (Content-Length when the size is known, else chunked). `reuse`: a file
        of the team with the same SHA-256 is answered instead of sending the bytes again (paths only)."""
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if reuse and (same := self._find(kind, file_sha256(path), name or path.name)) is not None:
                return same
            with open(path, "rb") as f:
                return self._upload(kind, f, name or path.name, reuse=False)
        headers = {"Content-Type": "application/octet-stream"}
        if (size := stream_size(source)) is not None:
            headers["Content-Length"] = str(size)
        if name is None and isinstance(getattr(source, "name", None), str):
            name = Path(source.name).name
        return FileOut(**self._json("POST", f"/v1/{kind}", params=params(name=name), content=file_chunks(source),
                                    headers=headers))

    def _find(self, kind: str, sha256: str, name: str | None = None) -> FileOut | None:
        """The team's newest file with this content (one named `name` first); None when it has none. The digest is
        checked here too: a server without the `sha256` filter answers every file."""
        rows = FilePage(**self._json("GET", f"/v1/{kind}", params={"sha256": sha256, "limit": 200})).data
        rows = [r for r in rows if r.sha256 == sha256]
        return next((r for r in rows if r.name == name), rows[0] if rows else None)

    def _download(self, path: str, dest: str | os.PathLike, default_name: str | None = None) -> Path:
        try:
            with self._http.stream("GET", path, headers=self._auth) as response:
                return save_checked(response, path, Path(dest), default_name)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # -- health and keys --------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """{status, checks}; a 503 (database or broker down) is returned, not raised."""
        try:
            response = self._http.get("/readyz", headers=self._auth)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code not in (200, 503):
            raise_for(response)
        return response.json()

    def create_key(self, team: str, name: str = "default", admin: bool = False) -> KeyCreated:
        """Admin only; the secret is in the answer's `key`, shown only this once."""
        return KeyCreated(**self._json("POST", "/v1/keys", json={"team": team, "name": name, "admin": admin}))

    def list_keys(self) -> list[KeyOut]:
        return [KeyOut(**k) for k in self._json("GET", "/v1/keys")]

    def revoke_key(self, key_id: str) -> None:
        self._request("DELETE", f"/v1/keys/{key_id}")

    # -- models and datasets ----------------------------------------------------------------------------------------

    def upload_model(self, source: Source, name: str | None = None, reuse: bool = False) -> FileOut:
        return self._upload("models", source, name, reuse)

    def find_model(self, sha256: str) -> FileOut | None:
        """The team's newest model with this SHA-256 (lowercase hex), or None."""
        return self._find("models", sha256)

    def list_models(self, limit: int = 50, after: str | None = None) -> FilePage:
        return FilePage(**self._json("GET", "/v1/models", params=params(limit=limit, after=after)))

    def get_model(self, model_id: str) -> FileOut:
        return FileOut(**self._json("GET", f"/v1/models/{model_id}"))

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{model_id}")

    def download_model(self, model_id: str, dest: str | os.PathLike) -> Path:
        return self._download(f"/v1/models/{model_id}/file", dest)

    def upload_dataset(self, source: Source, name: str | None = None, reuse: bool = False) -> FileOut:
        return self._upload("datasets", source, name, reuse)

    def find_dataset(self, sha256: str) -> FileOut | None:
        """The team's newest dataset with this SHA-256 (lowercase hex), or None."""
        return self._find("datasets", sha256)

    def list_datasets(self, limit: int = 50, after: str | None = None) -> FilePage:
        return FilePage(**self._json("GET", "/v1/datasets", params=params(limit=limit, after=after)))

    def get_dataset(self, dataset_id: str) -> FileOut:
        return FileOut(**self._json("GET", f"/v1/datasets/{dataset_id}"))

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    def download_dataset(self, dataset_id: str, dest: str | os.PathLike) -> Path:
        return self._download(f"/v1/datasets/{dataset_id}/file", dest)

    # -- jobs -------------------------------------------------------------------------------------------------------

    def create_job(self, model_id: str, recipe: dict[str, Any] | str, *, calibration: str | None = None,
                   train: str | None = None, eval: str | None = None, metadata: dict[str, Any] | None = None,
                   idempotency_key: str | None = None, priority: int | None = None) -> JobOut:
        """`recipe`: a recipe object or a preset name; datasets by id; `priority` 0 (lowest) to 9 (highest), the
        server's default when None. A replay of `idempotency_key` answers the job it created."""
        body = params(model_id=model_id, recipe=recipe, metadata=metadata or {}, priority=priority,
                      datasets=params(calibration=calibration, train=train, eval=eval))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobOut(**self._json("POST", "/v1/jobs", json=body, headers=headers))

    def list_jobs(self, status: str | None = None, model_id: str | None = None, limit: int = 50,
                  after: str | None = None) -> JobPage:
        query = params(status=status, model_id=model_id, limit=limit, after=after)
        return JobPage(**self._json("GET", "/v1/jobs", params=query))

    def iter_jobs(self, status: str | None = None, model_id: str | None = None) -> Iterator[JobOut]:
        """Every job (newest first), page after page."""
        after = None
        while True:
            page = self.list_jobs(status, model_id, limit=200, after=after)
            yield from page.data
            if not page.has_more:
                return
            after = page.next

    def get_job(self, job_id: str) -> JobOut:
        return JobOut(**self._json("GET", f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> JobOut:
        return JobOut(**self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def delete_job(self, job_id: str) -> None:
        """A finished job and its artifacts (409 `job_active` while it is queued or running: cancel it first)."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def rerun_job(self, job_id: str, idempotency_key: str | None = None) -> JobOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobOut(**self._json("POST", f"/v1/jobs/{job_id}/rerun", headers=headers))

    def events(self, job_id: str, after: int = 0) -> list[EventOut]:
        return [EventOut(**e) for e in self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after})["data"]]

    def stream_events(self, job_id: str, last_event_id: int | str | None = None,
                      reconnects: int = 5) -> Iterator[EventOut]:
        """The job's events as they happen (server-sent events), from after `last_event_id`; ends when the job has
        ended and every event was sent. A dropped connection resumes from the last event seen."""
        cursor = int(last_event_id) if last_event_id not in (None, "") else 0
        failures = 0
        while True:
            headers = {**self._auth, "Accept": "text/event-stream", "Last-Event-ID": str(cursor)}
            try:
                # No read timeout: the stream is quiet between events of a long step.
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", params={"stream": "true"},
                                       headers=headers, timeout=httpx.Timeout(self.timeout, read=None)) as response:
                    raise_for(response)
                    for kind, data in sse(response.iter_lines()):
                        failures = 0
                        if kind == "end":
                            return
                        event = EventOut(**json.loads(data))
                        cursor = event.id
                        yield event
                return  # the server closed the stream without `end`: it only does so once the job has ended
            except httpx.TransportError as exc:
                failures += 1
                if failures > reconnects:
                    raise self._unreachable(exc) from exc
                time.sleep(min(0.5 * 2 ** failures, 5.0))

    def wait(self, job_id: str, timeout: float | None = None, on_progress: Callable[[JobOut], None] | None = None,
             interval: float = 0.2, max_interval: float = 2.0) -> JobOut:
        """Polls the job until it ends (succeeded, failed or canceled) and returns it; WaitTimeout past `timeout`
        seconds. `on_progress(job)` is called on every change of status, stage or progress (`job.stage` is never
        None: the status stands in before the first stage). The poll interval grows from `interval` to
        `max_interval` while nothing changes and starts over when something does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple | None = None
        delay = interval
        while True:
            job = self.get_job(job_id)
            state = (job.status, job.stage, job.progress)
            if state != seen:
                seen, delay = state, interval
                if on_progress is not None:
                    on_progress(job)
            else:
                delay = min(delay * 1.5, max_interval)
            if job.status in TERMINAL:
                return job
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(job, timeout)
                delay = min(delay, left)
            time.sleep(delay)

    def download_artifact(self, job_id: str, name: str, dest: str | os.PathLike) -> Path:
        """`dest`: a file path, or a folder to write `name` into."""
        return self._download(f"/v1/jobs/{job_id}/artifacts/{name}", dest, default_name=name)

    def artifact_json(self, job_id: str, name: str = "report.json") -> Any:
        """A JSON artifact read into memory (report.json by default; a presigned-URL answer is followed)."""
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts/{name}", follow_redirects=True)

    def download_artifacts(self, job: JobOut | str, folder: str | os.PathLike) -> list[Path]:
        """Every artifact of the job into `folder` (created), under its own name."""
        job = self.get_job(job) if isinstance(job, str) else job
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [self.download_artifact(job.id, a.name, folder) for a in job.artifacts]

    # -- recipes ----------------------------------------------------------------------------------------------------

    def presets(self) -> list[dict[str, Any]]:
        """[{name, description, recipe}]"""
        return self._json("GET", "/v1/recipes/presets")["data"]

    def recipe_schema(self) -> dict[str, Any]:
        return self._json("GET", "/v1/recipes/schema")

    def validate_recipe(self, recipe: dict[str, Any] | str, model_format: str | None = None) -> RecipeValidation:
        """Never raises for a bad recipe: `valid` and `errors` [{field, message}] say what the server thinks."""
        body = {"recipe": recipe, **({"model_format": model_format} if model_format else {})}
        return RecipeValidation(**self._json("POST", "/v1/recipes/validate", json=body))

    # -- sweeps and comparison --------------------------------------------------------------------------------------

    def create_sweep(self, model_id: str, recipe: dict[str, Any] | str, grid: dict[str, list[Any]],
                     objective: str | dict[str, float], *, calibration: str | None = None, train: str | None = None,
                     eval: str | None = None, metadata: dict[str, Any] | None = None,
                     idempotency_key: str | None = None, priority: int | None = None) -> SweepOut:
        body = params(model_id=model_id, recipe=recipe, grid=grid, objective=objective, metadata=metadata or {},
                      priority=priority, datasets=params(calibration=calibration, train=train, eval=eval))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return SweepOut(**self._json("POST", "/v1/sweeps", json=body, headers=headers))

    def get_sweep(self, sweep_id: str, runtime: str | None = None, batch_size: int | None = None) -> SweepOut:
        query = params(runtime=runtime, batch_size=batch_size)
        return SweepOut(**self._json("GET", f"/v1/sweeps/{sweep_id}", params=query))

    def list_sweeps(self, model_id: str | None = None, limit: int = 50, after: str | None = None) -> SweepPage:
        query = params(model_id=model_id, limit=limit, after=after)
        return SweepPage(**self._json("GET", "/v1/sweeps", params=query))

    def sweep_pareto_png(self, sweep_id: str, runtime: str | None = None, batch_size: int | None = None) -> bytes:
        query = params(runtime=runtime, batch_size=batch_size)
        return self._request("GET", f"/v1/sweeps/{sweep_id}/pareto.png", params=query).content

    def compare_jobs(self, model_id: str, runtime: str | None = None, batch_size: int | None = None,
                     limit: int = 500) -> Comparison:
        query = params(runtime=runtime, batch_size=batch_size, limit=limit)
        return Comparison(**self._json("GET", f"/v1/models/{model_id}/jobs/compare", params=query))

    def compare_jobs_png(self, model_id: str, runtime: str | None = None, batch_size: int | None = None) -> bytes:
        query = params(runtime=runtime, batch_size=batch_size)
        return self._request("GET", f"/v1/models/{model_id}/jobs/compare.png", params=query).content
