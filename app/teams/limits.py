"""Fairness between teams: the server's SQUEEZE_TEAM_* defaults, overridden per team by an admin (teams columns).

Counts (running, queued jobs; uploads per minute; stored bytes) use 0 for "no limit"; `max_priority` is a level.
Over a count limit is a 429 with Retry-After; a priority above the team's maximum is a 422.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import APIError
from app.core.tables import DatasetFile, Job, ModelFile, Team

LIMITS = ("max_running", "max_queued", "max_upload_bytes", "uploads_per_minute", "max_priority")
WINDOW_S = 60  # uploads_per_minute's window
QUEUED_RETRY_S = 30  # a queued job usually starts within this (Retry-After of the queued-jobs 429)
STORAGE_RETRY_S = 600  # stored bytes go down only when the team deletes something
RAISE = "or ask an admin to raise it (PATCH /v1/teams/{team}/limits)"


def setting_name(limit: str) -> str:
    return f"team_{limit}"


def effective(team: Team, settings: Settings) -> dict[str, int]:
    """Every limit of the team: its own value where an admin set one, else the server's default."""
    return {name: value if (value := getattr(team, name)) is not None else getattr(settings, setting_name(name))
            for name in LIMITS}


def team_limit(db: Session, settings: Settings, team_id: str, name: str) -> int:
    own = db.scalar(select(getattr(Team, name)).where(Team.id == team_id))
    return own if own is not None else getattr(settings, setting_name(name))


def _too_many(code: str, limit: str, value: int, current: int, message: str, retry_after_s: int) -> APIError:
    details = {"limit": limit, "value": value, "current": current, "retry_after_s": retry_after_s,
               "setting": f"SQUEEZE_{setting_name(limit).upper()}"}
    return APIError(429, code, message, details, headers={"Retry-After": str(retry_after_s)})


def usage(db: Session, team_id: str) -> dict[str, int]:
    """What the team holds now, in the limits' terms."""
    counts = dict(db.execute(select(Job.status, func.count()).where(
        Job.team_id == team_id, Job.status.in_(("queued", "running", "canceling"))).group_by(Job.status)).all())
    return {"running": counts.get("running", 0) + counts.get("canceling", 0), "queued": counts.get("queued", 0),
            "upload_bytes": stored_bytes(db, team_id), "uploads_last_minute": len(_recent_uploads(db, team_id))}


def check_priority(db: Session, settings: Settings, team_id: str, priority: int) -> None:
    highest = team_limit(db, settings, team_id, "max_priority")
    if priority > highest:
        message = (f"priority {priority} is above this team's maximum priority {highest}: use 0 to {highest}, "
                   f"{RAISE}")
        raise APIError(422, "priority_not_allowed", f"priority: {message}",
                       {"errors": [{"field": "priority", "message": message}], "max_priority": highest})


def check_queued(db: Session, settings: Settings, team_id: str, adding: int) -> None:
    """Room for `adding` more queued jobs (a sweep asks for all its points at once), else the 429. The team's row
    is locked first (PostgreSQL), so two submissions of one team cannot both take the last places."""
    limit = team_limit(db, settings, team_id, "max_queued")
    if not limit:
        return
    db.execute(select(Team.id).where(Team.id == team_id).with_for_update())
    queued = db.scalar(select(func.count()).select_from(Job).where(Job.team_id == team_id, Job.status == "queued"))
    if queued + adding > limit:
        raise _too_many("quota_exceeded", "max_queued", limit, queued,
                        f"this team has {queued} queued jobs and may have at most {limit} (max_queued); "
                        f"{adding} more would pass it: wait for queued jobs to start, cancel some, {RAISE}",
                        QUEUED_RETRY_S)


def check_submission(db: Session, settings: Settings, team_id: str, priority: int, adding: int = 1) -> None:
    check_priority(db, settings, team_id, priority)
    check_queued(db, settings, team_id, adding)


def stored_bytes(db: Session, team_id: str) -> int:
    return sum(int(db.scalar(select(func.coalesce(func.sum(row.size_bytes), 0)).where(  # PostgreSQL: a Decimal
        row.team_id == team_id, row.deleted_at.is_(None)))) for row in (ModelFile, DatasetFile))


def _recent_uploads(db: Session, team_id: str) -> list[datetime]:
    since = utcnow() - timedelta(seconds=WINDOW_S)
    return sorted(t for row in (ModelFile, DatasetFile)  # deleted uploads count: deleting does not give the minute back
                  for t in db.scalars(select(row.created_at).where(row.team_id == team_id, row.created_at > since)))


def check_upload_rate(db: Session, settings: Settings, team_id: str) -> None:
    limit = team_limit(db, settings, team_id, "uploads_per_minute")
    recent = _recent_uploads(db, team_id) if limit else []
    if limit and len(recent) >= limit:
        wait = max(1, math.ceil((recent[-limit] + timedelta(seconds=WINDOW_S) - utcnow()).total_seconds()))
        raise _too_many("rate_limited", "uploads_per_minute", limit, len(recent),
                        f"this team made {len(recent)} uploads in the last {WINDOW_S} s and may make at most {limit} "
                        f"(uploads_per_minute): retry in {wait} s, {RAISE}", wait)


def check_upload_bytes(db: Session, settings: Settings, team_id: str, incoming: int) -> None:
    limit = team_limit(db, settings, team_id, "max_upload_bytes")
    used = stored_bytes(db, team_id) if limit else 0
    if limit and used + incoming > limit:
        raise _too_many("quota_exceeded", "max_upload_bytes", limit, used,
                        f"this team stores {used} bytes of models and datasets and may store at most {limit} "
                        f"(max_upload_bytes); this upload of {incoming} bytes would pass it: delete models or "
                        f"datasets you no longer need, {RAISE}", STORAGE_RETRY_S)


def check_upload_start(db: Session, settings: Settings, team_id: str, declared: int) -> None:
    """Before a byte of the body is read: the rate, and the stored bytes plus the size the client declared."""
    try:
        check_upload_rate(db, settings, team_id)
        check_upload_bytes(db, settings, team_id, declared)
    finally:
        db.rollback()  # no transaction stays open while the body streams in


def set_limits(team: Team, changes: dict[str, Any]) -> None:
    """An admin's change: a number sets the team's own limit, None puts the server's default back."""
    for name, value in changes.items():
        setattr(team, name, value)
