"""Comparing jobs by their measured reports: headline rows, guard verdicts and Pareto fronts (no torch)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.core.auth import Principal
from app.core.tables import Job, ModelFile
from app.files import service as files
from app.recipes import GuardSpec
from app.reports import check_guard, headline, pareto_front

GUARD_FAILED = "guard_failed"


def has_report(job: Job) -> bool:
    """Succeeded, or failed only because it missed its guard: either way the result was measured."""
    return bool(job.metrics) and (job.status == "succeeded" or job.error_code == GUARD_FAILED)


def guard_verdict(job: Job) -> dict[str, Any] | None:
    """The worker's verdict when it recorded one; otherwise the same check on the stored metrics (jobs measured
    before the worker checked guards), so a result that misses its bounds is never shown as passing."""
    metrics = job.metrics or {}
    if metrics.get("guard") is not None:
        verdict = metrics["guard"]
    else:
        guard = (job.recipe or {}).get("guard")
        if not guard or not metrics:
            return None
        verdict = check_guard(GuardSpec.model_validate(guard), metrics)
    if job.error_code == GUARD_FAILED and verdict.get("passed"):
        verdict = {**verdict, "passed": False}  # the job's outcome is the truth
    return verdict


def job_row(job: Job, runtime: str | None = None, batch: int | None = None) -> dict[str, Any]:
    return {"job_id": job.id, "status": job.status, "error_code": job.error_code, "sweep_id": job.sweep_id,
            "created_at": job.created_at, "recipe": job.recipe, "outputs": job.outputs,
            "headline": headline(job.metrics, runtime, batch), "guard": guard_verdict(job)}


def fronts(heads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pareto fronts over {job id: headline}: size_bytes and latency_ms against accuracy (agreement when no job
    measured accuracy). Ids in cost order."""
    quality = next((q for q in ("accuracy_after", "agreement")
                    if any(h.get(q) is not None for h in heads.values())), None)
    if quality is None:
        return {"quality": None, "size": [], "latency": []}
    rows = [{**h, "job_id": ident} for ident, h in heads.items()]
    return {"quality": quality,
            "size": [r["job_id"] for r in pareto_front(rows, "size_bytes", quality)],
            "latency": [r["job_id"] for r in pareto_front(rows, "latency_ms", quality)]}


def compare_model(db: Session, principal: Principal, model_id: str, runtime: str | None, batch: int | None,
                  limit: int) -> dict[str, Any]:
    """The model's jobs that have a measured report (newest first, at most `limit`) and their Pareto fronts."""
    model = files.get_owned(db, principal, ModelFile, model_id)
    q = (select(Job).where(Job.team_id == principal.team_id, Job.model_id == model.id,
                           or_(Job.status == "succeeded", Job.error_code == GUARD_FAILED))
         .order_by(Job.id.desc()).limit(limit + 1))
    jobs = [j for j in db.scalars(q) if has_report(j)]
    truncated = len(jobs) > limit
    rows = [job_row(j, runtime, batch) for j in jobs[:limit]]
    return {"model_id": model.id, "runtime": runtime, "batch_size": batch, "data": rows, "truncated": truncated,
            "pareto": fronts({r["job_id"]: r["headline"] for r in rows})}


def plot_points(rows: list[dict[str, Any]], labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows -> what app.reports.plots draws: {id, label, size_bytes, latency_ms, accuracy_after, agreement, failed_guard}."""
    labels = labels or {}
    return [{"id": r["job_id"], "label": labels.get(r["job_id"], r["job_id"][-6:]),
             **{k: r["headline"].get(k) for k in ("size_bytes", "latency_ms", "accuracy_after", "agreement",
                                                  "runtime", "batch_size")},
             "failed_guard": r["error_code"] == GUARD_FAILED or (r["guard"] is not None and not r["guard"]["passed"])}
            for r in rows]
