"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.jobs.states import DEFAULT_PRIORITY, JOB_STATUSES
from app.recipes import Objective, Runtime

PRIORITY_HELP = ("0 (lowest) to 9 (highest): among the jobs waiting on the same queue, higher runs first with the "
                 "Redis broker (the embedded filesystem broker keeps submit order). Running jobs are not preempted. "
                 "Above the team's maximum (SQUEEZE_TEAM_MAX_PRIORITY, 5 by default; an admin may raise it per "
                 "team) is a 422.")
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Documents the error responses of a route (every route declares its own)."""
    return {s: {"model": ErrorBody, **({"headers": RETRY_AFTER} if s == 429 else {})} for s in statuses}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    team: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    name: str = Field("default", min_length=1, max_length=100)
    admin: bool = Field(False, strict=True)  # JSON true/false only: 0 or "no" is a 422, not a silent user key


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


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read false as 0: "no limit"
        raise ValueError("expected a number, not true/false")
    return value


LimitValue = Annotated[int, BeforeValidator(_not_a_bool)]


class TeamLimitsUpdate(BaseModel):
    """A team's own limits; a field left out stays as it is, null puts the server's default back. 0: no limit
    (max_priority: the highest priority level, 0-9)."""

    model_config = ConfigDict(extra="forbid")
    max_running: LimitValue | None = Field(None, ge=0, le=100_000, description="Running jobs at once.")
    max_queued: LimitValue | None = Field(None, ge=0, le=1_000_000, description="Queued jobs at once.")
    max_upload_bytes: LimitValue | None = Field(None, ge=0, le=2**50, description="Bytes of models and datasets "
                                                                                  "stored.")
    uploads_per_minute: LimitValue | None = Field(None, ge=0, le=1_000_000, description="Uploads in any 60 s.")
    max_priority: LimitValue | None = Field(None, ge=0, le=9, description="The highest job priority the team may "
                                                                          "use.")


class TeamUsage(BaseModel):
    running: int
    queued: int
    upload_bytes: int
    uploads_last_minute: int


class TeamLimits(BaseModel):
    team: str
    max_running: int
    max_queued: int
    max_upload_bytes: int
    uploads_per_minute: int
    max_priority: int
    overridden: list[str] = Field(..., description="The limits set for this team (the others: the server's "
                                                    "SQUEEZE_TEAM_* defaults).")
    usage: TeamUsage


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


WebhookEvent = Literal["started", "progress", "completed"]


class JobWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., min_length=1, max_length=2000, description="http(s); non-public addresses are refused "
                                                                     "unless allowlisted by the server.")
    events: list[WebhookEvent] = Field(["started", "completed"], min_length=1, max_length=3,
                                       description="completed: any final status (succeeded, failed, canceled).")
    secret: str | None = Field(None, min_length=16, max_length=100,
                               description="Signs the deliveries (whsec_<base64> or any string); without it the "
                                           "team's signing secret (POST /v1/webhooks/signing-secret) does.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(..., max_length=40)
    recipe: dict[str, Any] | str = Field(..., description="A recipe object or a preset name.")
    datasets: JobDatasets = Field(default_factory=JobDatasets)
    webhook: JobWebhook | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=9, description=PRIORITY_HELP)


class JobError(BaseModel):
    code: str
    message: str


class ArtifactOut(BaseModel):
    name: str
    format: str
    size_bytes: int
    sha256: str
    url: str
    label: str | None = Field(None, description="guard_failed: written by a job that missed its guard (kept so it "
                                                "can be inspected; not a result to ship).")


class JobWebhookOut(BaseModel):
    url: str
    events: list[str]


class JobOut(BaseModel):
    id: str
    status: Literal[JOB_STATUSES]  # type: ignore[valid-type]
    progress: float
    stage: str | None
    model_id: str
    recipe: dict[str, Any]
    outputs: list[str]
    datasets: dict[str, str]
    metadata: dict[str, Any]
    attempts: int
    queue: str = Field(description="The queue the job was routed to (training and CUDA jobs to the GPU queue when "
                                   "one is configured).")
    priority: int = Field(DEFAULT_PRIORITY, description=PRIORITY_HELP)
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    metrics: dict[str, Any] | None
    engine_seconds: float | None = Field(None, description="Time the engine spent in the sandbox.")
    artifacts: list[ArtifactOut]
    webhook: JobWebhookOut | None = Field(None, description="The job's own webhook (its secret is never shown).")


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


class SweepCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(..., max_length=40)
    recipe: dict[str, Any] | str = Field(..., description="The base recipe: an object or a preset name.")
    grid: dict[str, list[Any]] = Field(
        ..., min_length=1, max_length=16,
        description='Recipe paths to the values tried, e.g. {"steps[0].sparsity": [0.3, 0.5], '
                    '"steps[1].method": ["static_int8", "dynamic_int8"]}; paths: steps[i], steps[i].field, '
                    'evaluate(.field), guard(.field), outputs, device. One job per point of the cartesian product.')
    objective: Objective = Field(..., description='"smallest" (size ratio), "fastest" (speed-up) or weights '
                                                  '{"size", "speed", "accuracy"}; higher score wins.')
    datasets: JobDatasets = Field(default_factory=JobDatasets)
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=9, description="Every point's job priority. " + PRIORITY_HELP)


class ParetoFronts(BaseModel):
    quality: Literal["accuracy_after", "agreement"] | None = Field(
        description="The quality axis: accuracy when any job measured it, else agreement with the original.")
    size: list[str] = Field(description="Job ids on the size_bytes vs quality front, smallest first.")
    latency: list[str] = Field(description="Job ids on the latency_ms vs quality front, fastest first.")


class SweepPoint(BaseModel):
    index: int
    values: dict[str, Any]
    job_id: str
    status: str
    error: JobError | None
    headline: dict[str, Any] | None = Field(description="app.reports.headline of the job's metrics, once measured.")
    guard: dict[str, Any] | None = Field(description="{passed, checks}; null when the recipe has no guard.")
    score: float | None
    qualifies: bool = Field(description="Succeeded, met its guard and has the figures the objective needs.")


class SweepPick(BaseModel):
    point: int
    job_id: str
    values: dict[str, Any]
    score: float


class SweepSummary(BaseModel):
    id: str
    model_id: str
    recipe: dict[str, Any] | str
    grid: dict[str, list[Any]]
    objective: Any
    datasets: dict[str, str]
    metadata: dict[str, Any]
    created_at: datetime
    points_total: int
    counts: dict[str, int] = Field(description="Points by job status.")
    done: bool = Field(description="Every point's job has finished (succeeded, failed or canceled).")


class SweepOut(SweepSummary):
    points: list[SweepPoint]
    pick: SweepPick | None = Field(description="The best qualifying point by the objective, over all points, once "
                                               "the sweep is done.")
    pick_reason: str | None = Field(description="Why there is no pick (yet).")
    pareto: ParetoFronts


class SweepPage(Page):
    data: list[SweepSummary]


class CompareRow(BaseModel):
    job_id: str
    status: str
    error_code: str | None
    sweep_id: str | None
    created_at: datetime
    recipe: dict[str, Any]
    outputs: list[str]
    headline: dict[str, Any]
    guard: dict[str, Any] | None


class Comparison(BaseModel):
    model_id: str
    runtime: Runtime | None
    batch_size: int | None
    data: list[CompareRow] = Field(description="The model's jobs with a measured report (succeeded or "
                                               "guard_failed), newest first.")
    truncated: bool = Field(description="More jobs than `limit` have reports; only the newest are compared.")
    pareto: ParetoFronts


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., min_length=1, max_length=2000)
    events: list[WebhookEvent] = Field(["started", "completed"], min_length=1, max_length=3)
    description: str | None = Field(None, max_length=255)


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(..., description="Verifies this webhook's deliveries; shown only in this response.")


class WebhookList(BaseModel):
    data: list[WebhookOut]


class SigningSecret(BaseModel):
    secret: str = Field(..., description="Signs the deliveries of job webhooks submitted without a secret; shown "
                                         "only in this response (a new one replaces the old at once).")


class DeliveryOut(BaseModel):
    id: str
    message_id: str = Field(description="The webhook-id header: the same on every attempt of one message.")
    webhook_id: str | None = Field(description="The team webhook; null for the job's own webhook.")
    event: str
    url: str
    attempt: int
    status: Literal["pending", "delivered", "failed", "canceled"]
    status_code: int | None
    response_excerpt: str | None
    error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
