from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.dependencies import Caller, ReadDb, WriteDb
from app.api.routes.files import download_response
from app.api.schemas import EventList, EventOut, JobCreate, JobOut, JobPage, error_responses
from app.api.views import job_out, mark_replayed
from app.blobs.store import make_store
from app.core.auth import Principal
from app.core.config import get_settings
from app.core.db import get_read_sessionmaker
from app.core.tables import Job
from app.jobs import service as jobs
from app.jobs.states import TERMINAL_STATUSES

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceling", "canceled"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401))


@router.post("", status_code=202, response_model=JobOut, responses=error_responses(404, 409, 422, 429))
def create(body: JobCreate, response: Response, db: WriteDb, principal: Caller,
           idempotency_key: str | None = Header(None, max_length=255)) -> JobOut:
    job, created = jobs.create_job(db, get_settings(), principal, body, idempotency_key)
    mark_replayed(response, created)
    return job_out(job)


@router.get("", response_model=JobPage, responses=error_responses(422))
def list_(db: ReadDb, principal: Caller, limit: int = Query(50, ge=1, le=200),
          after: str | None = Query(None, max_length=40), status: JobStatus | None = None,
          model_id: str | None = Query(None, max_length=40)) -> JobPage:
    rows, more = jobs.list_jobs(db, principal, limit, after, status, model_id)
    return JobPage(data=[job_out(j) for j in rows], has_more=more, next=rows[-1].id if more else None)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
def show(job_id: str, db: ReadDb, principal: Caller) -> Response:
    # The polling hot path: serialise once here rather than have FastAPI validate the model again.
    return Response(job_out(jobs.get_job(db, principal, job_id)).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=error_responses(404, 409))
def cancel(job_id: str, db: WriteDb, principal: Caller) -> JobOut:
    return job_out(jobs.cancel_job(db, principal, job_id))


@router.delete("/{job_id}", status_code=204, responses=error_responses(404, 409))
def delete(job_id: str, db: WriteDb, principal: Caller) -> None:
    """A finished job, its events and artifacts; frees the storage nothing else uses. 409 while it is active."""
    jobs.delete_job(db, make_store(), principal, job_id)


@router.post("/{job_id}/rerun", status_code=202, response_model=JobOut,
              responses=error_responses(404, 409, 422, 429))
def rerun(job_id: str, response: Response, db: WriteDb, principal: Caller,
          idempotency_key: str | None = Header(None, max_length=255)) -> JobOut:
    """A new job with the same model, datasets and recipe; its metadata has `rerun_of`."""
    job, created = jobs.rerun_job(db, get_settings(), principal, job_id, idempotency_key)
    mark_replayed(response, created)
    return job_out(job)


def _event_out(e) -> EventOut:
    return EventOut(id=e.id, type=e.type, message=e.message, data=e.data or {}, created_at=e.created_at)


@router.get("/{job_id}/events", response_model=EventList,
            responses={200: {"content": {"text/event-stream": {}}}, **error_responses(404)})
async def events(job_id: str, request: Request, db: ReadDb, principal: Caller,
                 after: int = Query(0, ge=0), stream: bool = False,
                 last_event_id: str | None = Header(None, max_length=20)):
    if last_event_id and last_event_id.isdigit():
        after = max(after, int(last_event_id))
    first = await run_in_threadpool(jobs.list_events, db, principal, job_id, after)
    if not stream:
        return EventList(data=[_event_out(e) for e in first])

    async def sse():
        cursor, batch = after, first
        while True:
            for e in batch:
                cursor = e.id
                yield f"id: {e.id}\nevent: {e.type}\ndata: {_event_out(e).model_dump_json()}\n\n"
            status = await run_in_threadpool(_status, job_id)
            if status in TERMINAL_STATUSES and not batch:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)
            batch = await run_in_threadpool(_events_since, principal, job_id, cursor)

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _status(job_id: str) -> str | None:
    with get_read_sessionmaker()() as db:
        job = db.get(Job, job_id)
        return job.status if job else None


def _events_since(principal: Principal, job_id: str, cursor: int):
    with get_read_sessionmaker()() as db:
        return jobs.list_events(db, principal, job_id, cursor)


@router.get("/{job_id}/artifacts/{name}", responses={200: {"content": {"application/octet-stream": {}}},
                                                    **error_responses(404)})
def artifact(job_id: str, name: str, request: Request, db: ReadDb, principal: Caller) -> Response:
    art = jobs.get_artifact(db, principal, job_id, name)
    return download_response(request, make_store(), art.sha256, art.name)
