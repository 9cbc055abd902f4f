"""The thin Celery task: claim the row, run the supervisor, record the outcome."""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import DBAPIError

from app.core.config import get_settings
from app.core.db import database_unreachable, session_scope
from app.core.logging import job_id_var
from app.jobs import lifecycle
from app.queue.broker import RUN_JOB_TASK, broker_priority
from worker import supervisor
from worker.celery_app import celery

log = logging.getLogger("squeeze.worker")


@celery.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str | None:
    token = job_id_var.set(job_id)  # every log line of this job (task, supervisor) carries its id
    try:
        return _run(self, job_id)
    finally:
        job_id_var.reset(token)


def _run(self, job_id: str) -> str | None:
    settings = get_settings()
    try:
        with session_scope() as db:
            claim = lifecycle.claim(db, job_id, worker=self.request.hostname or "worker",
                                    team_limit=settings.team_max_running)
    except lifecycle.TeamBusy as busy:  # still queued: back on its queue, and this worker takes the next message
        self.apply_async(args=[job_id], queue=busy.queue, countdown=settings.team_defer_s,
                         priority=broker_priority(busy.priority))
        log.info("team at its running-jobs limit; deferred %.1f s", settings.team_defer_s)
        return None
    if claim is None:  # someone else has it, or it was canceled: a redelivery is a no-op
        return None
    log.info("job claimed (attempt %d)", claim.attempt, extra={"attempt": claim.attempt})
    outcome = supervisor.run(claim)
    if outcome is None:  # the lease was lost (reaped as dead): another attempt owns the job now
        return None
    final = _finish(job_id, claim.lease, outcome, settings)
    log.info("job %s", final or "result dropped (lease lost)",
             extra={"status": final, "error_code": outcome.error_code, "engine_seconds": outcome.engine_seconds})
    return final


def _finish(job_id: str, lease: str, outcome, settings) -> str | None:
    """Records the outcome, retrying while the database is unreachable: the artifacts are already in the blob store,
    and giving up would leave the job to be reaped and run again. Past the heartbeat timeout a reaper may have
    requeued it; `finish` then finds the lease gone and drops this result."""
    deadline = time.monotonic() + settings.heartbeat_timeout_s
    while True:
        try:
            with session_scope() as db:
                return lifecycle.finish(db, job_id, lease, outcome)
        except DBAPIError as exc:
            if not database_unreachable(exc) or time.monotonic() > deadline:
                raise
            log.warning("recording the result failed, database unreachable; retrying: %s", exc.orig)
            time.sleep(settings.heartbeat_interval_s)
