from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from app import queue
from app.db import get_engine, get_sessionmaker
from app.models import JOB_STATUSES, Job

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _db_ok() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get("/readyz", responses={503: {"description": "the database or the broker is unreachable"}})
async def readyz() -> JSONResponse:
    checks = {"database": await run_in_threadpool(_db_ok), "broker": await run_in_threadpool(queue.broker_ok)}
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> str:
    with get_sessionmaker()() as db:
        counts = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines = ["# HELP squeeze_jobs Jobs by status.", "# TYPE squeeze_jobs gauge"]
    lines += [f'squeeze_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in JOB_STATUSES]
    return "\n".join(lines) + "\n"
