"""Sweeps: one recipe over a grid of values, a job per point, and the pick by an objective."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Response

from app.api.dependencies import Caller, ReadDb, WriteDb
from app.api.schemas import (
    SweepCreate,
    SweepOut,
    SweepPage,
    SweepSummary,
    error_responses,
)
from app.api.views import mark_replayed
from app.core.config import get_settings
from app.jobs import sweeps
from app.recipes import Runtime
from app.reports.comparison import plot_points

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses=error_responses(401))
PNG = {200: {"content": {"image/png": {}}}}


@router.post("", status_code=202, response_model=SweepOut, responses=error_responses(404, 409, 422, 429))
def create(body: SweepCreate, response: Response, db: WriteDb, principal: Caller,
           idempotency_key: str | None = Header(None, max_length=240)) -> SweepOut:
    sweep, created = sweeps.create_sweep(db, get_settings(), principal, body, idempotency_key)
    mark_replayed(response, created)
    return SweepOut(**sweeps.sweep_report(db, sweep))


@router.get("", response_model=SweepPage, responses=error_responses(422))
def list_(db: ReadDb, principal: Caller, limit: int = Query(50, ge=1, le=200),
          after: str | None = Query(None, max_length=40),
          model_id: str | None = Query(None, max_length=40)) -> SweepPage:
    rows, more = sweeps.list_sweeps(db, principal, limit, after, model_id)
    return SweepPage(data=[SweepSummary(**r) for r in rows], has_more=more, next=rows[-1]["id"] if more else None)


@router.get("/{sweep_id}", response_model=SweepOut, responses=error_responses(404, 422))
def show(sweep_id: str, db: ReadDb, principal: Caller, runtime: Runtime | None = None,
         batch_size: int | None = Query(None, ge=1, le=4096)) -> SweepOut:
    return SweepOut(**sweeps.sweep_report(db, sweeps.get_sweep(db, principal, sweep_id), runtime, batch_size))


@router.get("/{sweep_id}/pareto.png", responses={**PNG, **error_responses(404, 422)})
def pareto_png(sweep_id: str, db: ReadDb, principal: Caller, runtime: Runtime | None = None,
               batch_size: int | None = Query(None, ge=1, le=4096)) -> Response:
    from app.reports.plots import pareto_png as render

    report = sweeps.sweep_report(db, sweeps.get_sweep(db, principal, sweep_id), runtime, batch_size)
    rows = [{"job_id": p["job_id"], "error_code": (p["error"] or {}).get("code"), "headline": p["headline"],
             "guard": p["guard"]} for p in report["points"] if p["headline"] is not None]
    labels = {p["job_id"]: f"p{p['index']}" for p in report["points"]}
    png, drawn = render(plot_points(rows, labels), report["pareto"], title=f"sweep {sweep_id}",
                        pick=report["pick"]["job_id"] if report["pick"] else None)
    return Response(png, media_type="image/png", headers={"X-Plotted-Points": str(len({d["id"] for d in drawn}))})
