"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app import models


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Documents the error responses of a route (every route declares its own)."""
    return {s: {"model": ErrorBody} for s in statuses}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    team: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    name: str = Field("default", min_length=1, max_length=100)
    admin: bool = False


class KeyOut(BaseModel):
    id: str
    team: str
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(..., description="The secret; shown only in this response.")


class FileOut(BaseModel):
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    details: dict[str, Any]
    created_at: datetime
    url: str


class Page(BaseModel):
    data: list[Any]
    has_more: bool
    next: str | None


class ModelPage(Page):
    data: list[FileOut]


class JobDatasets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    calibration: str | None = None
    train: str | None = None
    eval: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(..., max_length=40)
    recipe: dict[str, Any] | str = Field(..., description="A recipe object or a preset name.")
    datasets: JobDatasets = Field(default_factory=JobDatasets)
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    code: str
    message: str


class ArtifactOut(BaseModel):
    name: str
    format: str
    size_bytes: int
    sha256: str
    url: str


class JobOut(BaseModel):
    id: str
    status: Literal[models.JOB_STATUSES]  # type: ignore[valid-type]
    progress: float
    stage: str | None
    model_id: str
    recipe: dict[str, Any]
    outputs: list[str]
    datasets: dict[str, str]
    metadata: dict[str, Any]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    metrics: dict[str, Any] | None
    engine_seconds: float | None = Field(None, description="Time the engine spent in the sandbox.")
    artifacts: list[ArtifactOut]


class JobPage(Page):
    data: list[JobOut]


class EventOut(BaseModel):
    id: int
    type: str
    message: str | None
    data: dict[str, Any]
    created_at: datetime


class EventList(BaseModel):
    data: list[EventOut]


class RecipeValidation(BaseModel):
    valid: bool
    recipe: dict[str, Any] | None = None
    outputs: list[str] | None = None
    errors: list[dict[str, str]] = []


def job_out(job: models.Job) -> JobOut:
    return JobOut(
        id=job.id, status=job.status, progress=round(job.progress, 4), stage=job.stage, model_id=job.model_id,
        recipe=job.recipe, outputs=job.outputs, datasets=job.datasets or {}, metadata=job.job_metadata or {},
        attempts=job.attempts, created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        metrics=job.metrics, engine_seconds=job.engine_seconds,
        artifacts=[ArtifactOut(name=a.name, format=a.format, size_bytes=a.size_bytes, sha256=a.sha256,
                               url=f"/v1/jobs/{job.id}/artifacts/{a.name}") for a in job.artifacts],
    )


def file_out(row: models.Model | models.Dataset, kind: str) -> FileOut:
    return FileOut(id=row.id, name=row.name, format=row.format, sha256=row.sha256, size_bytes=row.size_bytes,
                   details=row.details or {}, created_at=row.created_at, url=f"/v1/{kind}/{row.id}/file")
