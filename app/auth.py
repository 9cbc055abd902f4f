"""Bearer API keys, scoped to a team. Keys are stored as SHA-256 digests only."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import get_db, new_id
from app.errors import APIError
from app.models import ApiKey, Team

KEY_PREFIX = "sqz_"


@dataclass(frozen=True)
class Principal:
    key_id: str
    team_id: str
    team: str
    is_admin: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def ensure_team(db: Session, name: str) -> Team:
    team = db.scalar(select(Team).where(Team.name == name))
    if team is None:
        team = Team(id=new_id("team"), name=name)
        db.add(team)
        db.flush()
    return team


def create_key(db: Session, team_name: str, name: str, *, is_admin: bool = False, key: str | None = None
               ) -> tuple[ApiKey, str]:
    """Creates a key for a team (creating the team if new); returns the row and the plaintext key."""
    key = key or generate_key()
    team = ensure_team(db, team_name)
    row = ApiKey(id=new_id("key"), team_id=team.id, name=name, key_hash=hash_key(key), prefix=key[:8],
                 is_admin=is_admin)
    db.add(row)
    db.flush()
    return row, key


def ensure_bootstrap_admin(db: Session, key: str, team_name: str) -> None:
    """Makes sure the configured admin key exists (and is not revoked) at start-up."""
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None:
        create_key(db, team_name, "bootstrap-admin", is_admin=True, key=key)
    elif row.revoked_at is not None or not row.is_admin:
        row.revoked_at, row.is_admin = None, True
    db.commit()


def authenticate(request: Request, db: Session = Depends(get_db)) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(token.strip())
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # The lookup is by digest (no secret-dependent timing); compare_digest keeps the final check constant-time.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        raise APIError(401, "unauthorized", "invalid or revoked API key")
    principal = Principal(key_id=row.id, team_id=row.team_id, team=row.team.name, is_admin=row.is_admin)
    request.state.principal = principal
    return principal


def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_admin:
        # An admin-only resource is not secret: 403 says plainly that this key lacks the right.
        raise APIError(403, "forbidden", "this endpoint needs an admin key")
    return principal
