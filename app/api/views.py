"""Rows to response bodies: the one place where an ORM row becomes a wire schema (app/api/schemas.py imports
no table)."""

from __future__ import annotations

from fastapi import Response

from app.api.schemas import ArtifactOut, FileOut, JobError, JobOut, JobWebhookOut
from app.core.tables import DatasetFile, Job, ModelFile


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, status=job.status, progress=round(job.progress, 4), stage=job.stage, model_id=job.model_id,
        recipe=job.recipe, outputs=job.outputs, datasets=job.datasets or {}, metadata=job.job_metadata or {},
        attempts=job.attempts, queue=job.queue, priority=job.priority, created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        metrics=job.metrics, engine_seconds=job.engine_seconds,
        artifacts=[ArtifactOut(name=a.name, format=a.format, size_bytes=a.size_bytes, sha256=a.sha256,
                               url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
                               label="guard_failed" if job.error_code == "guard_failed" else None)
                   for a in job.artifacts],
        webhook=JobWebhookOut(url=job.webhook["url"], events=job.webhook["events"]) if job.webhook else None,
    )


def file_out(row: ModelFile | DatasetFile, kind: str) -> FileOut:
    return FileOut(id=row.id, name=row.name, format=row.format, sha256=row.sha256, size_bytes=row.size_bytes,
                   details=row.details or {}, created_at=row.created_at, url=f"/v1/{kind}/{row.id}/file")


def mark_replayed(response: Response, created: bool) -> None:
    """An Idempotency-Key seen before answers 200 with the first request's resource and says so in a header."""
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
