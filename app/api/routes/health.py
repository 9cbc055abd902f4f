from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.prometheus import scrape
from app.api.schemas import error_responses
from app.core.auth import require_metrics_reader
from app.core.db import get_engine, get_read_sessionmaker
from app.queue import broker

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
    checks = {"database": await run_in_threadpool(_db_ok), "broker": await run_in_threadpool(broker.broker_ok)}
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401, 403),
            dependencies=[Depends(require_metrics_reader)])
def metrics() -> Response:
    """Prometheus text format; what each metric means is in app/api/prometheus.py. Every team's counts: an admin key or
    the scraper's SQUEEZE_METRICS_TOKEN as a bearer token."""
    with get_read_sessionmaker()() as db:
        body = scrape(db)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
