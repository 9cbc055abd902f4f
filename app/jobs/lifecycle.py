"""The job state machine, shared by the API and the worker. The job row is the truth (docs/reliability.md).

Every transition is one conditional UPDATE, so concurrent workers, redelivered messages and the
reapers of several processes can race without a job running twice or being lost: `claim` only
takes a queued row, and only the holder of the current `lease` may record progress or a result.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from app.blobs import references
from app.blobs.store import BlobStore, make_store
from app.core.db import new_id, utcnow
from app.core.tables import Artifact, DatasetFile, Job, JobEvent, ModelFile, Team
from app.recipes import teacher_model_ids
from app.webhooks import delivery

log = logging.getLogger("squeeze.lifecycle")
ACTIVE = ("running", "canceling")


def add_event(db: Session, job_id: str, type_: str, message: str | None = None,
              data: dict[str, Any] | None = None) -> None:
    db.add(JobEvent(job_id=job_id, type=type_, message=message, data=data or {}))


@dataclass
class Claim:
    """What a worker needs to run a job, read at claim time."""

    job_id: str
    lease: str
    attempt: int
    recipe: dict[str, Any]
    outputs: list[str]
    model_format: str
    model_sha256: str
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> {sha256, format}
    teachers: dict[str, dict[str, str]] = field(default_factory=dict)  # model id -> {sha256, format}


class TeamBusy(Exception):
    """The job's team already runs its limit of jobs: the job stays queued and its message should come back
    later (to `queue`); its `enqueued_at` is bumped, so the reaper re-sends it only if that message is lost."""

    def __init__(self, job_id: str, queue: str, priority: int):
        super().__init__(f"{job_id}: the team is at its running-jobs limit")
        self.queue, self.priority = queue, priority


TEAM_WAIT_STAGE = "waiting: the team is at its running-jobs limit"


def _team_cap(db: Session, job_id: str, default: int) -> tuple[str, int] | None:
    """(team id, its running-jobs limit) of a queued job: the team's own max_running where an admin set one, else
    `default`; None when the job is not queued."""
    row = db.execute(select(Job.team_id, Team.max_running).join(Team, Team.id == Job.team_id)
                     .where(Job.id == job_id, Job.status == "queued")).one_or_none()
    if row is None:
        return None
    return row.team_id, default if row.max_running is None else row.max_running


def claim(db: Session, job_id: str, worker: str, team_limit: int = 0) -> Claim | None:
    """Atomically takes a queued job; None when it is not queued (a duplicate delivery, a cancel).
    While the team has its limit of jobs running (its own max_running, else `team_limit`, the server's
    SQUEEZE_TEAM_MAX_RUNNING; 0: none), raises TeamBusy instead of taking it."""
    lease = secrets.token_hex(8)
    now = utcnow()
    conditions = [Job.id == job_id, Job.status == "queued"]
    cap = _team_cap(db, job_id, team_limit)
    if cap is None:
        db.rollback()
        return None
    team_id, limit = cap
    if limit:
        # PostgreSQL: a team's claims take turns on its row, so the count below (a fresh snapshot per statement)
        # sees every claim committed before; SQLite runs the one UPDATE under its write lock anyway.
        db.execute(select(Team.id).where(Team.id == team_id).with_for_update())
        other = aliased(Job)  # not correlated with the row being updated
        running = (select(func.count()).select_from(other)
                   .where(other.team_id == team_id, other.status.in_(ACTIVE)).scalar_subquery())
        conditions.append(running < limit)
    taken = db.execute(
        update(Job).where(*conditions)
        .values(status="running", lease=lease, worker=worker, attempts=Job.attempts + 1, heartbeat_at=now,
                started_at=now, stage="starting", progress=0.0, error_code=None, error_message=None)
    ).rowcount
    if not taken:
        waiting = db.execute(select(Job.queue, Job.priority).where(Job.id == job_id, Job.status == "queued")
                             ).one_or_none() if limit else None
        if waiting is None:
            db.rollback()
            return None
        db.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                   .values(enqueued_at=now, stage=TEAM_WAIT_STAGE))
        db.commit()
        raise TeamBusy(job_id, *waiting)
    job = db.get(Job, job_id)
    db.refresh(job)
    model = db.get(ModelFile, job.model_id)
    datasets = {}
    for role, ident in (job.datasets or {}).items():
        ds = db.get(DatasetFile, ident)
        datasets[role] = {"sha256": ds.sha256, "format": ds.format}
    teachers = {}  # distillation teachers other than the original, checked to be the team's at submit
    for ident in dict.fromkeys(teacher_model_ids(job.recipe)):
        row = db.get(ModelFile, ident)
        if row is not None:
            teachers[ident] = {"sha256": row.sha256, "format": row.format}
    add_event(db, job_id, "started", f"attempt {job.attempts} on {worker}", {"attempt": job.attempts,
                                                                              "worker": worker})
    delivery.enqueue(db, job_id, "started")  # in the same transaction: the delivery survives a restart
    db.commit()
    return Claim(job_id=job_id, lease=lease, attempt=job.attempts, recipe=job.recipe, outputs=job.outputs,
                 model_format=model.format, model_sha256=model.sha256, datasets=datasets, teachers=teachers)


def heartbeat(db: Session, job_id: str, lease: str, *, progress: float | None = None, stage: str | None = None,
              events: list[tuple[str, str | None, dict[str, Any]]] = ()) -> str | None:
    """Records liveness (and progress, events); returns the job's status, or None if the lease is lost."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if stage is not None:
        values["stage"] = stage[:100]
    held = db.execute(update(Job).where(Job.id == job_id, Job.lease == lease, Job.status.in_(ACTIVE))
                      .values(**values)).rowcount
    if not held:
        db.rollback()
        return None
    for type_, message, data in events:
        add_event(db, job_id, type_, message, data)
    status = db.scalar(select(Job.status).where(Job.id == job_id))
    if progress is not None and status == "running":
        delivery.enqueue(db, job_id, "progress")
    db.commit()
    return status


@dataclass
class Outcome:
    status: str  # succeeded | failed | canceled
    error_code: str | None = None
    error_message: str | None = None
    metrics: dict[str, Any] | None = None
    engine_seconds: float | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # name, format, size_bytes, sha256


def _artifacts_kept(db: Session, outcome: Outcome, store: BlobStore) -> Outcome:
    """Takes the artifacts' digest locks (held until the result commits) and checks their blobs are still stored: a
    release of the same bytes may have freed one since the worker put it. One gone fails the job (no rows)."""
    for sha256 in sorted({a["sha256"] for a in outcome.artifacts}):
        references.lock(db, sha256)
    lost = [a["name"] for a in outcome.artifacts if not store.exists(a["sha256"])]
    if not lost:
        return outcome
    return Outcome("failed", "artifact_lost", f"the stored copy of {', '.join(lost)} was freed (the same bytes were "
                   "deleted) before the result was recorded; run the job again", metrics=outcome.metrics,
                   engine_seconds=outcome.engine_seconds)


def finish(db: Session, job_id: str, lease: str, outcome: Outcome, store: BlobStore | None = None) -> str | None:
    """Records the result if this worker still holds the lease; a cancel requested meanwhile wins. Artifact rows
    are written under their digests' locks, their blobs checked (`_artifacts_kept`; `store`: the configured one)."""
    if outcome.artifacts and outcome.status in ("succeeded", "failed"):
        outcome = _artifacts_kept(db, outcome, store or make_store())
    now = utcnow()
    values = dict(finished_at=now, lease=None, metrics=outcome.metrics, engine_seconds=outcome.engine_seconds,
                  error_code=outcome.error_code, error_message=outcome.error_message)
    final = outcome.status
    done = db.execute(update(Job).where(Job.id == job_id, Job.lease == lease, Job.status == "running")
                      .values(status=final, progress=1.0 if final == "succeeded" else Job.progress,
                              stage=final, **values)).rowcount
    if not done:
        final = "canceled"
        done = db.execute(update(Job).where(Job.id == job_id, Job.lease == lease, Job.status == "canceling")
                          .values(status=final, stage=final, **{**values, "error_code": None,
                                                                "error_message": None})).rowcount
    if not done:
        db.rollback()
        log.warning("job %s: lease %s lost before finishing; result dropped", job_id, lease)
        return None
    if final in ("succeeded", "failed"):  # a failed job may still have results (guard_failed keeps its artifacts)
        for a in outcome.artifacts:
            db.add(Artifact(id=new_id("art"), job_id=job_id, **a))
    message = outcome.error_message if final == "failed" else "succeeded" if final == "succeeded" else None
    add_event(db, job_id, final, message, {"error_code": outcome.error_code} if final == "failed" else {})
    delivery.enqueue(db, job_id, "completed")
    db.commit()
    return final


def reap(db: Session, *, heartbeat_timeout_s: float, requeue_after_s: float, max_attempts: int,
         send: Callable[[str, str, int], None]) -> dict[str, int]:
    """Requeues jobs whose worker stopped heartbeating and re-sends queued jobs nobody claimed."""
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "canceled": 0, "resent": 0}
    stale = list(db.scalars(select(Job).where(Job.status.in_(ACTIVE),
                                              Job.heartbeat_at < now - timedelta(seconds=heartbeat_timeout_s))))
    to_send: list[tuple[str, str, int]] = []
    for job in stale:
        base = update(Job).where(Job.id == job.id, Job.lease == job.lease, Job.status == job.status)
        if job.status == "canceling":
            if db.execute(base.values(status="canceled", stage="canceled", lease=None, finished_at=now)).rowcount:
                add_event(db, job.id, "canceled", "canceled (its worker was lost)")
                delivery.enqueue(db, job.id, "completed")
                counts["canceled"] += 1
        elif job.attempts >= max_attempts:
            msg = f"worker lost {job.attempts} times (last: {job.worker}); giving up"
            if db.execute(base.values(status="failed", stage="failed", lease=None, finished_at=now,
                                      error_code="worker_lost", error_message=msg)).rowcount:
                add_event(db, job.id, "failed", msg, {"error_code": "worker_lost"})
                delivery.enqueue(db, job.id, "completed")
                counts["failed"] += 1
        elif db.execute(base.values(status="queued", stage="requeued", lease=None, enqueued_at=now)).rowcount:
            add_event(db, job.id, "requeued", f"worker {job.worker} stopped heartbeating; requeued",
                      {"attempt": job.attempts})
            counts["requeued"] += 1
            to_send.append((job.id, job.queue, job.priority))
    unclaimed = list(db.execute(select(Job.id, Job.queue, Job.priority, Job.enqueued_at).where(
        Job.status == "queued", Job.enqueued_at < now - timedelta(seconds=requeue_after_s))))
    for job_id, queue_name, priority, enqueued_at in unclaimed:
        if db.execute(update(Job).where(Job.id == job_id, Job.status == "queued", Job.enqueued_at == enqueued_at)
                      .values(enqueued_at=now)).rowcount:
            counts["resent"] += 1
            to_send.append((job_id, queue_name, priority))
    db.commit()
    for job_id, queue_name, priority in to_send:  # after commit: a fast worker must find the row queued
        try:
            send(job_id, queue_name, priority)
        except Exception as exc:
            log.warning("re-send of %s failed (next sweep retries): %s", job_id, exc)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts


def start_reaper(stop: threading.Event) -> None:
    """Runs `reap` every few seconds in a daemon thread until `stop` is set (API and workers each run one: the
    UPDATEs are atomic, and a job is requeued even when no worker is alive)."""
    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.queue import broker

    settings = get_settings()

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                with session_scope() as db:
                    reap(db, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                         requeue_after_s=settings.requeue_after_s, max_attempts=settings.max_attempts,
                         send=broker.enqueue)
            except Exception as exc:  # a DB or broker outage: the next sweep tries again
                log.warning("reaper sweep failed: %s", exc)

    threading.Thread(target=loop, name="reaper", daemon=True).start()
