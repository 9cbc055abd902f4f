"""Comparison across a model's jobs: headline figures side by side and their Pareto fronts (JSON or PNG)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from app.api.dependencies import Caller, ReadDb
from app.api.schemas import Comparison, error_responses
from app.recipes import Runtime
from app.reports import comparison

router = APIRouter(prefix="/v1/models", tags=["comparison"], responses=error_responses(401))


@router.get("/{model_id}/jobs/compare", response_model=Comparison, responses=error_responses(404, 422))
def compare(model_id: str, db: ReadDb, principal: Caller, runtime: Runtime | None = None,
            batch_size: int | None = Query(None, ge=1, le=4096),
            limit: int = Query(500, ge=1, le=5000)) -> Comparison:
    return Comparison(**comparison.compare_model(db, principal, model_id, runtime, batch_size, limit))


@router.get("/{model_id}/jobs/compare.png", responses={200: {"content": {"image/png": {}}},
                                                      **error_responses(404, 422)})
def compare_png(model_id: str, db: ReadDb, principal: Caller, runtime: Runtime | None = None,
                batch_size: int | None = Query(None, ge=1, le=4096),
                limit: int = Query(500, ge=1, le=5000)) -> Response:
    from app.reports.plots import pareto_png

    report = comparison.compare_model(db, principal, model_id, runtime, batch_size, limit)
    png, drawn = pareto_png(comparison.plot_points(report["data"]), report["pareto"],
                            title=f"jobs of model {model_id}")
    return Response(png, media_type="image/png", headers={"X-Plotted-Points": str(len({d["id"] for d in drawn}))})
