"""Sweeps: one recipe over a grid of values, a job per point, and the pick among them by an objective.

Every point is an ordinary job submitted through the same code as POST /v1/jobs (validation, queue routing,
teacher checks, idempotency), tagged with `jobs.sweep_id` and `metadata.sweep = {point, values}`. Each point runs
from the original model: points whose recipes share leading steps do not reuse each other's intermediate model,
because jobs are independent and retryable (a requeue, a cancel or a rerun touches one point and never waits on
another's half-finished work).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api.schemas import JobCreate, SweepCreate
from app.core.auth import Principal, owned
from app.core.config import Settings
from app.core.db import new_id
from app.core.errors import APIError, not_found
from app.core.tables import Job, Sweep
from app.jobs import service as jobs
from app.jobs.states import TERMINAL_STATUSES
from app.recipes import PRESETS, STEP_SPECS, EvaluateSpec, GuardSpec, WeightedObjective
from app.reports import headline, objective_score
from app.reports.comparison import GUARD_FAILED, fronts, guard_verdict, has_report
from app.teams import limits

MAX_ERRORS = 20
_PATH = re.compile(r"^(?:steps\[(?P<step>\d+)\](?:\.(?P<step_field>\w+))?|(?P<section>evaluate|guard)"
                   r"(?:\.(?P<section_field>\w+))?|(?P<top>outputs|device))$")
_SECTION_FIELDS = {"evaluate": set(EvaluateSpec.model_fields), "guard": set(GuardSpec.model_fields)}
_STEP_FIELDS = set().union(*(spec.model_fields for spec in STEP_SPECS))


@dataclass
class Point:
    index: int
    values: dict[str, Any]
    positions: dict[str, int]  # grid path -> index of this point's value in grid[path]
    recipe: dict[str, Any]


def _invalid(errors: list[dict[str, Any]], code: str = "invalid_sweep") -> APIError:
    return APIError(422, code, "; ".join(f"{e['field']}: {e['message']}" for e in errors), {"errors": errors})


def _base_recipe(value: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(value, str):
        if value not in PRESETS:
            jobs.validate_recipe(value, None)  # raises the 422 that lists the presets
        value = PRESETS[value]["recipe"]
    return copy.deepcopy(value)


def _path_error(path: str, recipe: dict[str, Any]) -> str | None:
    m = _PATH.match(path)
    if m is None:
        return ("unknown path; use steps[i], steps[i].<field>, evaluate(.<field>), guard(.<field>), outputs or "
                "device")
    if m["step"] is not None:
        steps = recipe.get("steps")
        if not isinstance(steps, list) or int(m["step"]) >= len(steps):
            return f"the recipe has no steps[{m['step']}] ({len(steps) if isinstance(steps, list) else 0} steps)"
        if m["step_field"] and m["step_field"] not in _STEP_FIELDS:
            return f"unknown step field {m['step_field']!r}"
    elif m["section_field"] and m["section_field"] not in _SECTION_FIELDS[m["section"]]:
        return f"unknown field {m['section_field']!r} of {m['section']}"
    return None


def _set(recipe: dict[str, Any], path: str, value: Any) -> None:
    m = _PATH.match(path)
    value = copy.deepcopy(value)
    if m["step"] is not None:
        i = int(m["step"])
        if m["step_field"]:
            if not isinstance(recipe["steps"][i], dict):
                recipe["steps"][i] = {}
            recipe["steps"][i][m["step_field"]] = value
        else:
            recipe["steps"][i] = value
    elif m["section_field"]:
        if not isinstance(recipe.get(m["section"]), dict):
            recipe[m["section"]] = {}
        recipe[m["section"]][m["section_field"]] = value
    else:
        recipe[m["section"] or m["top"]] = value


def expand(base: dict[str, Any], grid: dict[str, list[Any]], max_points: int) -> list[Point]:
    """The cartesian product of the grid (first path varies slowest) applied to the base recipe."""
    errors = []
    if not isinstance(base.get("steps"), list):
        errors.append({"field": "recipe.steps", "message": "the base recipe needs a list of steps"})
    for path, values in grid.items():
        problem = _path_error(path, base) if not errors else None
        if problem:
            errors.append({"field": f'grid["{path}"]', "message": problem})
        elif not values:
            errors.append({"field": f'grid["{path}"]', "message": "give at least one value"})
        elif len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            errors.append({"field": f'grid["{path}"]', "message": "values repeat (the points would be the same)"})
    if errors:
        raise _invalid(errors)
    total = 1
    for values in grid.values():
        total *= len(values)
    if total > max_points:
        raise _invalid([{"field": "grid", "message": f"{total} points; at most {max_points} per sweep "
                                                     "(SQUEEZE_SWEEP_MAX_POINTS)"}], code="too_many_points")
    points = []
    paths = list(grid)
    for index, positions in enumerate(itertools.product(*(range(len(grid[p])) for p in paths))):
        recipe = copy.deepcopy(base)
        for path, pos in zip(paths, positions):
            _set(recipe, path, grid[path][pos])
        points.append(Point(index, {p: grid[p][pos] for p, pos in zip(paths, positions)},
                            dict(zip(paths, positions)), recipe))
    return points


def _name(field: str, point: Point) -> str:
    """A recipe field of a point -> the grid entry that set it, else the field in that point's recipe."""
    for path, pos in point.positions.items():
        if field == path or field.startswith((path + ".", path + "[")):
            return f'grid["{path}"][{pos}]'
    return f"points[{point.index}].recipe" + ("" if field == "recipe" else f".{field}")


def _check_objective(objective: Any) -> None:
    if isinstance(objective, WeightedObjective) and not (objective.size or objective.speed or objective.accuracy):
        raise _invalid([{"field": "objective", "message": "give at least one weight above 0 (size, speed, "
                                                          "accuracy)"}])


def _stored_request(body: SweepCreate) -> dict[str, Any]:
    dumped = body.model_dump(mode="json")
    dumped["datasets"] = {role: ident for role, ident in dumped["datasets"].items() if ident}
    return dumped


def _point_body(body: SweepCreate, point: Point) -> JobCreate:
    return JobCreate(model_id=body.model_id, recipe=point.recipe, datasets=body.datasets, priority=body.priority,
                     metadata={**body.metadata, "sweep": {"point": point.index, "values": point.values}})


def create_sweep(db: Session, settings: Settings, principal: Principal, body: SweepCreate,
                 idempotency_key: str | None) -> tuple[Sweep, bool]:
    """Validates every point (a 422 names the grid entry or point and field), then inserts the sweep and a job per
    point. With an Idempotency-Key K, point i is submitted with key "K:i"; a repeat of the request returns the
    first sweep. Returns (sweep, created)."""
    request = _stored_request(body)
    if idempotency_key:
        replayed = _replay(db, principal, request, idempotency_key)
        if replayed is not None:
            return replayed, False
    _check_objective(body.objective)
    points = expand(_base_recipe(body.recipe), body.grid, settings.sweep_max_points)
    bodies = [_point_body(body, p) for p in points]
    errors: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for point, job_body in zip(points, bodies):
        try:
            jobs.check_job(db, principal, job_body)
        except APIError as exc:
            if exc.status != 422 or "errors" not in exc.details:
                raise
            for e in exc.details["errors"]:
                field = e["field"].removeprefix("recipe.") if e["field"] != "recipe" else "recipe"
                entry = {"field": _name(field, point), "message": e["message"], "point": point.index,
                         "recipe_field": field}
                # One entry per grid value (or per recipe field outside the grid), not one per point it recurs in.
                key = (entry["field"] if entry["field"].startswith("grid") else field, e["message"])
                if key not in seen:
                    seen.add(key)
                    errors.append(entry)
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise _invalid(errors[:MAX_ERRORS], code="invalid_recipe")
    limits.check_submission(db, settings, principal.team_id, body.priority, adding=len(points))  # all or none
    sweep = Sweep(id=new_id("swp"), team_id=principal.team_id, model_id=body.model_id, recipe=request["recipe"],
                  grid=request["grid"], objective=request["objective"], datasets=request["datasets"],
                  sweep_metadata=request["metadata"])
    db.add(sweep)
    db.flush()  # committed with the first point's job, so a sweep never exists without its jobs
    for point, job_body in zip(points, bodies):
        key = f"{idempotency_key}:{point.index}" if idempotency_key else None
        job, created = jobs.create_job(db, settings, principal, job_body, key, sweep_id=sweep.id)
        if not created and point.index == 0:  # a concurrent request with the same key got there first
            db.rollback()
            other = db.get(Sweep, job.sweep_id) if job.sweep_id else None
            if other is None:
                raise _conflict(job.id)
            return other, False
    return sweep, True


def _conflict(job_id: str) -> APIError:
    return APIError(409, "idempotency_conflict", "this Idempotency-Key was used with a different request body",
                    {"job_id": job_id})


def _replay(db: Session, principal: Principal, request: dict[str, Any], key: str) -> Sweep | None:
    first = db.scalar(select(Job).where(Job.team_id == principal.team_id, Job.idempotency_key == f"{key}:0"))
    if first is None:
        return None
    sweep = db.get(Sweep, first.sweep_id) if first.sweep_id else None
    if sweep is None:
        raise _conflict(first.id)
    stored = {"model_id": sweep.model_id, "recipe": sweep.recipe, "grid": sweep.grid, "objective": sweep.objective,
              "datasets": sweep.datasets, "metadata": sweep.sweep_metadata,
              "priority": first.priority}  # every point's job carries the sweep's priority
    if json.dumps(stored, sort_keys=True) != json.dumps(request, sort_keys=True):
        raise _conflict(first.id)
    return sweep


def get_sweep(db: Session, principal: Principal, sweep_id: str) -> Sweep:
    sweep = owned(db.get(Sweep, sweep_id), principal)
    if sweep is None:
        raise not_found("sweep", sweep_id)
    return sweep


def _point_jobs(db: Session, sweep_id: str) -> list[Job]:
    rows = db.scalars(select(Job).where(Job.sweep_id == sweep_id))
    return sorted(rows, key=lambda j: ((j.job_metadata or {}).get("sweep", {}).get("point", 0), j.id))


def _summary(sweep: Sweep, counts: dict[str, int]) -> dict[str, Any]:
    total = sum(counts.values())
    return {"id": sweep.id, "model_id": sweep.model_id, "recipe": sweep.recipe, "grid": sweep.grid,
            "objective": sweep.objective, "datasets": sweep.datasets or {}, "metadata": sweep.sweep_metadata or {},
            "created_at": sweep.created_at, "points_total": total, "counts": counts,
            "done": total > 0 and sum(counts.get(s, 0) for s in TERMINAL_STATUSES) == total}


def _quality(head: dict[str, Any]) -> float:
    for key in ("accuracy_after", "agreement"):
        if head.get(key) is not None:
            return head[key]
    return float("-inf")


def _no_pick_reason(points: list[dict[str, Any]], jobs_: list[Job]) -> str:
    why = Counter()
    for p, job in zip(points, jobs_):
        if job.error_code == GUARD_FAILED or (p["guard"] is not None and not p["guard"]["passed"]):
            why["missed the guard"] += 1
        elif job.status == "failed":
            why[f"failed ({job.error_code})"] += 1
        elif job.status == "canceled":
            why["were canceled"] += 1
        elif p["score"] is None:
            why["lack a figure the objective needs"] += 1
    return "no point qualifies: " + ", ".join(f"{n} {what}" for what, n in why.items())


def sweep_report(db: Session, sweep: Sweep, runtime: str | None = None, batch: int | None = None) -> dict[str, Any]:
    """The sweep, every point's headline, guard verdict and score, the Pareto fronts and the pick. The pick is
    the best qualifying point over all points, so it is given only once every point has finished."""
    jobs_ = _point_jobs(db, sweep.id)
    points = []
    for job in jobs_:
        reported = has_report(job)
        head = headline(job.metrics, runtime, batch) if reported else None
        verdict = guard_verdict(job) if reported else None
        score = objective_score(sweep.objective, head) if head else None
        sweep_meta = (job.job_metadata or {}).get("sweep", {})
        points.append({
            "index": sweep_meta.get("point", len(points)), "values": sweep_meta.get("values", {}), "job_id": job.id,
            "status": job.status,
            "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
            "headline": head, "guard": verdict, "score": score,
            "qualifies": job.status == "succeeded" and (verdict is None or verdict["passed"]) and score is not None,
        })
    out = _summary(sweep, dict(Counter(j.status for j in jobs_)))
    pick, reason = None, None
    if not out["done"]:
        reason = f"{sum(j.status not in TERMINAL_STATUSES for j in jobs_)} of {len(jobs_)} points not finished"
    else:
        qualifying = [p for p in points if p["qualifies"]]
        if qualifying:
            best = max(qualifying, key=lambda p: (p["score"], _quality(p["headline"]), -p["index"]))
            pick = {"point": best["index"], "job_id": best["job_id"], "values": best["values"], "score": best["score"]}
        else:
            reason = _no_pick_reason(points, jobs_)
    out.update(points=points, pick=pick, pick_reason=reason,
               pareto=fronts({p["job_id"]: p["headline"] for p in points if p["headline"] is not None}))
    return out


def list_sweeps(db: Session, principal: Principal, limit: int, after: str | None,
                model_id: str | None) -> tuple[list[dict[str, Any]], bool]:
    q = select(Sweep).where(Sweep.team_id == principal.team_id)
    if after:
        q = q.where(Sweep.id < after)
    if model_id:
        q = q.where(Sweep.model_id == model_id)
    rows = list(db.scalars(q.order_by(Sweep.id.desc()).limit(limit + 1)))
    more, rows = len(rows) > limit, rows[:limit]
    counts: dict[str, dict[str, int]] = {s.id: {} for s in rows}
    if rows:
        for sweep_id, status, n in db.execute(select(Job.sweep_id, Job.status, func.count()).where(
                Job.sweep_id.in_(list(counts))).group_by(Job.sweep_id, Job.status)):
            counts[sweep_id][status] = n
    return [_summary(s, counts[s.id]) for s in rows], more
