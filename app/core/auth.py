"""Bearer API keys, scoped to a team. Keys are stored as SHA-256 digests only."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.db import get_read_db, new_id
from app.core.errors import APIError
from app.core.tables import ApiKey, Team

KEY_PREFIX = "sqz_"
Row = TypeVar("Row")


@dataclass(frozen=True)
class Principal:
    key_id: str
    team_id: str
    team: str
    is_admin: bool


def owned(row: Row | None, principal: Principal) -> Row | None:
    """The row when the principal's team owns it and it is not deleted, else None: the one ownership rule. A
    caller answers None as not found (404), never forbidden, so another team's ids are not even confirmed."""
    record: Any = row
    if record is None or record.team_id != principal.team_id or getattr(record, "deleted_at", None) is not None:
        return None
    return row


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
    """Creates the configured admin key at start-up when it does not exist yet. A key that exists is left as it is:
    once revoked it stays revoked across restarts (configure a new SQUEEZE_BOOTSTRAP_ADMIN_KEY to get one back)."""
    if db.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))) is not None:
        return
    try:
        create_key(db, team_name, "bootstrap-admin", is_admin=True, key=key)
        db.commit()
    except IntegrityError:  # another API process created it at the same moment
        db.rollback()


_cache: dict[str, tuple[Principal, float]] = {}


def forget_key(key_id: str) -> None:
    """Drops a revoked key from this process's cache so the revocation applies at once."""
    for digest, (principal, _) in list(_cache.items()):
        if principal.key_id == key_id:
            _cache.pop(digest, None)


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticate(request: Request, db: Session = Depends(get_read_db)) -> Principal:
    token = _bearer(request)
    if token is None:
        raise APIError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(token)
    cached = _cache.get(digest)
    if cached is not None and cached[1] > time.monotonic():
        principal = cached[0]
    else:
        row = db.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        # The lookup is by digest (no secret-dependent timing); compare_digest keeps the check constant-time.
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            raise APIError(401, "unauthorized", "invalid or revoked API key")
        principal = Principal(key_id=row.id, team_id=row.team_id, team=row.team.name, is_admin=row.is_admin)
        ttl = get_settings().auth_cache_ttl_s
        if ttl > 0:
            if len(_cache) > 10_000:
                _cache.clear()
            _cache[digest] = (principal, time.monotonic() + ttl)
    request.state.principal = principal
    return principal


def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_admin:
        # An admin-only resource is not secret: 403 says plainly that this key lacks the right.
        raise APIError(403, "forbidden", "this endpoint needs an admin key")
    return principal


def require_metrics_reader(request: Request, db: Session = Depends(get_read_db)) -> None:
    """GET /metrics spans every team: the scraper's token (SQUEEZE_METRICS_TOKEN) or an admin key."""
    token, expected = _bearer(request), get_settings().metrics_token
    if token and expected and hmac.compare_digest(hash_key(token), hash_key(expected)):
        return
    require_admin(authenticate(request, db))
