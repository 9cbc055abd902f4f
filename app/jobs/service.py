"""Job submission, listing, cancel and events: the API side of a job's life."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from app.api.schemas import JobCreate, JobDatasets, JobWebhook
from app.blobs import references
from app.blobs.store import BlobStore
from app.core.auth import Principal, owned
from app.core.config import Settings
from app.core.db import new_id, utcnow
from app.core.errors import APIError, not_found
from app.core.tables import Artifact, DatasetFile, Job, JobEvent, ModelFile
from app.jobs.lifecycle import add_event
from app.jobs.states import TERMINAL_STATUSES
from app.queue import broker
from app.recipes import (
    TRAINING_STEPS,
    DistillSpec,
    Recipe,
    RecipeError,
    check_against_format,
    parse_recipe,
    teacher_model_ids,
)
from app.teams import limits
from app.webhooks import delivery
from app.webhooks.service import check_job_webhook

log = logging.getLogger("squeeze.jobs")


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _recipe_error(exc: RecipeError) -> APIError:
    errors = [{"field": f"recipe.{e['field']}" if e["field"] != "recipe" else "recipe", "message": e["message"]}
              for e in exc.errors]
    return APIError(422, "invalid_recipe", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                    {"errors": errors})


def validate_recipe(value: Any, model_format: str | None) -> tuple[Recipe, list[str] | None]:
    """A recipe (object or preset) -> the typed Recipe and its outputs, or a 422 naming each bad field."""
    try:
        recipe = parse_recipe(value)
        outputs = check_against_format(recipe, model_format) if model_format else recipe.outputs
    except RecipeError as exc:
        raise _recipe_error(exc) from None
    return recipe, outputs


def job_queue(settings: Settings, recipe: Recipe) -> str:
    """The GPU queue (when configured) for jobs that train or ask for CUDA; the default queue otherwise."""
    trains = any(isinstance(step, TRAINING_STEPS) for step in recipe.steps)
    wants_gpu = recipe.device == "cuda" or (trains and recipe.device != "cpu")
    return settings.queue_gpu if settings.queue_gpu and wants_gpu else settings.queue_default


TEXT_FORMATS = ("txt", "jsonl", "parquet")  # datasets tokenized in the job (worker/engine/text.py)


def check_job(db: Session, principal: Principal, body: JobCreate
              ) -> tuple[ModelFile, dict[str, str], Recipe, list[str]]:
    """Everything a submit checks before inserting (the model, datasets and teachers are the team's; the recipe
    fits the model's format) -> (model, datasets, recipe, outputs), or the 404/422."""
    model = owned(db.get(ModelFile, body.model_id), principal)
    if model is None:
        raise not_found("model", body.model_id)
    datasets = {role: ident for role, ident in body.datasets.model_dump().items() if ident}
    for role, ident in datasets.items():
        row = owned(db.get(DatasetFile, ident), principal)
        if row is None:
            raise APIError(404, "not_found", f"dataset {ident!r} (datasets.{role}) not found",
                           {"field": f"datasets.{role}", "id": ident})
        if row.format in TEXT_FORMATS and model.format != "hf":
            raise APIError(422, "invalid_dataset", f"dataset {ident!r} (datasets.{role}) is {row.format} text, "
                           "tokenized by the model's own tokenizer: it needs a Hugging Face model (a folder with its "
                           f"tokenizer files), not {model.format}; upload token ids as a .npz instead",
                           {"field": f"datasets.{role}", "id": ident})
    recipe, outputs = validate_recipe(body.recipe, model.format)
    eval_role = recipe.evaluate.dataset
    if recipe.guard and recipe.guard.max_accuracy_drop is not None and eval_role not in datasets:
        raise APIError(422, "invalid_recipe", f"recipe.guard.max_accuracy_drop needs accuracy: give a labelled "
                                              f"datasets.{eval_role}", {"errors": [{
                                                  "field": "recipe.guard.max_accuracy_drop",
                                                  "message": f"needs datasets.{eval_role} (with labels)"}]})
    for i, step in enumerate(recipe.steps):  # a teacher is another model of the same team
        teacher = step.teacher if isinstance(step, DistillSpec) else "original"
        if teacher != "original":
            if owned(db.get(ModelFile, teacher), principal) is None:
                raise APIError(404, "not_found", f"teacher model {teacher!r} (recipe.steps[{i}].teacher) not found",
                               {"field": f"recipe.steps[{i}].teacher", "id": teacher})
    return model, datasets, recipe, outputs


def create_job(db: Session, settings: Settings, principal: Principal, body: JobCreate,
               idempotency_key: str | None, sweep_id: str | None = None) -> tuple[Job, bool]:
    """Validates and inserts a queued job, then enqueues it (422 for a priority above the team's maximum, 429 past
    its queued-jobs limit). Returns (job, created)."""
    request_hash = _request_hash(body)
    if idempotency_key:
        existing = _by_idempotency_key(db, principal, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash), False
    model, datasets, recipe, outputs = check_job(db, principal, body)
    if sweep_id is None:  # a sweep checks the priority and the queue room of all its points at once
        limits.check_submission(db, settings, principal.team_id, body.priority)
    webhook = check_job_webhook(db, settings, principal, body.webhook)
    job = Job(id=new_id("job"), team_id=principal.team_id, model_id=model.id, status="queued",
              recipe=recipe.model_dump(mode="json"),
              outputs=outputs, datasets=datasets, job_metadata=body.metadata, queue=job_queue(settings, recipe),
              priority=body.priority, enqueued_at=utcnow(), idempotency_key=idempotency_key,
              request_hash=request_hash, sweep_id=sweep_id, webhook=webhook)
    db.add(job)
    try:
        db.flush()
        add_event(db, job.id, "queued", "job accepted", {"recipe_preset": body.recipe
                                                         if isinstance(body.recipe, str) else None})
        db.commit()
    except IntegrityError:
        db.rollback()
        existing = _by_idempotency_key(db, principal, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, request_hash), False
    try:
        broker.enqueue(job.id, job.queue, job.priority)
    except Exception as exc:  # the row is the truth: the reaper re-sends queued jobs nobody claimed
        log.warning("enqueue of %s failed, the reaper will re-send it: %s", job.id, exc)
    return job, True


def _by_idempotency_key(db: Session, principal: Principal, key: str) -> Job | None:
    return db.scalar(select(Job).where(Job.team_id == principal.team_id, Job.idempotency_key == key))


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise APIError(409, "idempotency_conflict",
                       "this Idempotency-Key was used with a different request body", {"job_id": job.id})
    return job


def get_job(db: Session, principal: Principal, job_id: str) -> Job:
    job = owned(db.get(Job, job_id, options=[joinedload(Job.artifacts)]), principal)  # one query: the hot path
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(db: Session, principal: Principal, limit: int, after: str | None, status: str | None,
              model_id: str | None) -> tuple[list[Job], bool]:
    q = select(Job).where(Job.team_id == principal.team_id)
    if after:
        q = q.where(Job.id < after)
    if status:
        q = q.where(Job.status == status)
    if model_id:
        q = q.where(Job.model_id == model_id)
    rows = list(db.scalars(q.order_by(Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_job(db: Session, principal: Principal, job_id: str) -> Job:
    """Queued: canceled at once. Running: marked canceling; the supervisor kills the sandbox."""
    job = get_job(db, principal, job_id)
    now = utcnow()
    canceled_now = db.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                              .values(status="canceled", finished_at=now, stage="canceled")).rowcount
    done = canceled_now
    if not done:
        done = db.execute(update(Job).where(Job.id == job.id, Job.status == "running")
                          .values(status="canceling")).rowcount
    if done:
        add_event(db, job.id, "cancel_requested", "cancel requested")
        if canceled_now:  # that is the job's completion (a running job's comes with `finish`)
            delivery.enqueue(db, job.id, "completed")
        db.commit()
    db.refresh(job)
    if job.status in TERMINAL_STATUSES and not done and job.status != "canceled":
        raise APIError(409, "not_cancelable", f"job is already {job.status}", {"status": job.status})
    return job


def delete_job(db: Session, store: BlobStore, principal: Principal, job_id: str) -> None:
    """A finished job goes with its events, artifacts and webhook deliveries (pending ones are dropped); then the
    blobs nothing else refers to are freed: its artifacts, and the deleted uploads it was the last to hold."""
    job = get_job(db, principal, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise APIError(409, "job_active", f"job is {job.status}: cancel it first, then delete it",
                       {"status": job.status})
    held = [a.sha256 for a in job.artifacts]
    model_ids = [job.model_id, *teacher_model_ids(job.recipe)]
    held += db.scalars(select(ModelFile.sha256).where(ModelFile.id.in_(model_ids)))
    held += db.scalars(select(DatasetFile.sha256).where(DatasetFile.id.in_(list((job.datasets or {}).values()))))
    # the status condition: a job is never deleted from under a claim (terminal jobs are never claimed again)
    db.execute(delete(Job).where(Job.id == job.id, Job.status.in_(TERMINAL_STATUSES)))
    db.commit()
    references.release(db, store, held)


def list_events(db: Session, principal: Principal, job_id: str, after: int = 0) -> list[JobEvent]:
    get_job(db, principal, job_id)
    return list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                           .order_by(JobEvent.id)))


def get_artifact(db: Session, principal: Principal, job_id: str, name: str) -> Artifact:
    job = get_job(db, principal, job_id)
    art = db.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if art is None:
        raise not_found("artifact", name)
    return art


def rerun_job(db: Session, settings: Settings, principal: Principal, job_id: str,
              idempotency_key: str | None) -> tuple[Job, bool]:
    """A new job with the same model, datasets and recipe, submitted (and routed) like a fresh POST /v1/jobs;
    its metadata keeps the original's, with `rerun_of` naming it (and without the original's sweep point)."""
    old = get_job(db, principal, job_id)
    metadata = {k: v for k, v in (old.job_metadata or {}).items() if k not in ("sweep", "rerun_of")}
    body = JobCreate(model_id=old.model_id, recipe=old.recipe, datasets=JobDatasets(**(old.datasets or {})),
                     webhook=JobWebhook(**old.webhook) if old.webhook else None,
                     metadata={**metadata, "rerun_of": old.id}, priority=old.priority)
    return create_job(db, settings, principal, body, idempotency_key)
