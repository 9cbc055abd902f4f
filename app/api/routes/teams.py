"""A team's fairness limits: read by the team itself or an admin, changed by an admin only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.dependencies import Caller, WriteDb
from app.api.schemas import TeamLimits, TeamLimitsUpdate, TeamUsage, error_responses
from app.core.config import get_settings
from app.core.errors import APIError, not_found
from app.core.tables import Team
from app.teams import limits

router = APIRouter(prefix="/v1/teams", tags=["teams"], responses=error_responses(401, 404))
TeamName = Path(..., min_length=1, max_length=100)


def _team(db: WriteDb, principal: Caller, team: str = TeamName) -> Team:
    """The named team, for an admin or the team's own key; a dependency, so that it answers before the body is read."""
    row = db.scalar(select(Team).where(Team.name == team))
    if row is None or not (principal.is_admin or row.id == principal.team_id):
        raise not_found("team", team)  # another team's limits: as if it did not exist
    return row


def _out(db: Session, team: Team) -> TeamLimits:
    overridden = [name for name in limits.LIMITS if getattr(team, name) is not None]
    return TeamLimits(team=team.name, **limits.effective(team, get_settings()), overridden=overridden,
                      usage=TeamUsage(**limits.usage(db, team.id)))


@router.get("/{team}/limits", response_model=TeamLimits, responses=error_responses(422))
def show(db: WriteDb, row: Team = Depends(_team)) -> TeamLimits:
    """The team's limits (its own where an admin set them, else the server's defaults) and what it uses now."""
    return _out(db, row)


@router.patch("/{team}/limits", response_model=TeamLimits, responses=error_responses(403, 422))
def update(body: TeamLimitsUpdate, db: WriteDb, principal: Caller, row: Team = Depends(_team)) -> TeamLimits:
    """Admin only (a team's own key: 403): sets the given limits for the team; null puts the server's default back."""
    if not principal.is_admin:
        raise APIError(403, "forbidden", "changing a team's limits needs an admin key")
    limits.set_limits(row, body.model_dump(include=body.model_fields_set))
    db.commit()
    return _out(db, row)
