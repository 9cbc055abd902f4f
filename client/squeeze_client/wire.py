"""What the server answers, as the client reads it: the client's own pydantic models (no server import).

Each model types the fields a client relies on and keeps any other field the server sends (extra="allow"), so a
newer server's additions reach `model_dump()` and attribute access instead of being dropped. Progress callbacks and
event readers never see None where a word belongs: a job's `stage` falls back to its status, an event's `message`
to a sentence made from its type and data.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class FileOut(Wire):
    """An uploaded model or dataset."""

    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    details: dict[str, Any] = {}
    created_at: datetime
    url: str


class Page(Wire):
    data: list[Any]
    has_more: bool
    next: str | None = None


class FilePage(Page):
    data: list[FileOut]


class JobError(Wire):
    code: str
    message: str


class ArtifactOut(Wire):
    name: str
    format: str
    size_bytes: int
    sha256: str
    url: str
    label: str | None = None  # guard_failed: written by a job that missed its guard (not a result to ship)


class JobOut(Wire):
    id: str
    status: str  # queued, running, succeeded, failed, canceling, canceled
    progress: float
    stage: str
    model_id: str
    recipe: dict[str, Any] = {}
    outputs: list[str] = []
    datasets: dict[str, str] = {}
    metadata: dict[str, Any] = {}
    priority: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = None
    metrics: dict[str, Any] | None = None
    artifacts: list[ArtifactOut] = []

    @model_validator(mode="before")
    @classmethod
    def _stage_never_none(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("stage"):  # a queued job has no stage yet: its status stands in
            data = {**data, "stage": str(data.get("status") or "unknown")}
        return data


class JobPage(Page):
    data: list[JobOut]


def _event_message(kind: str, data: dict[str, Any]) -> str:
    """A sentence for an event the server sent without one."""
    if kind == "step_done":
        seconds = data.get("seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        return f"step {data.get('index', '?')} ({data.get('type') or 'step'}) done{took}"
    if data.get("error_code"):
        return f"{kind}: {data['error_code']}"
    return kind.replace("_", " ")


class EventOut(Wire):
    id: int
    type: str
    message: str
    data: dict[str, Any] = {}
    created_at: datetime

    @model_validator(mode="before")
    @classmethod
    def _message_never_none(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("message"):
            data = {**data, "message": _event_message(str(data.get("type")), data.get("data") or {})}
        return data


class KeyOut(Wire):
    id: str
    team: str
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None


class KeyCreated(KeyOut):
    key: str  # the secret; shown only in this answer


class RecipeValidation(Wire):
    valid: bool
    recipe: dict[str, Any] | None = None
    outputs: list[str] | None = None
    errors: list[dict[str, str]] = []


class SweepSummary(Wire):
    id: str
    model_id: str
    points_total: int
    counts: dict[str, int] = {}
    done: bool
    created_at: datetime


class SweepOut(SweepSummary):
    points: list[dict[str, Any]] = []
    pick: dict[str, Any] | None = None
    pick_reason: str | None = None
    pareto: dict[str, Any] = {}


class SweepPage(Page):
    data: list[SweepSummary]


class Comparison(Wire):
    model_id: str
    data: list[dict[str, Any]]
    truncated: bool = False
    pareto: dict[str, Any] = {}
