from fastapi import APIRouter
from sqlalchemy import select

from app.api.dependencies import Admin, WriteDb
from app.api.schemas import KeyCreate, KeyCreated, KeyOut, error_responses
from app.core.auth import create_key, forget_key
from app.core.db import utcnow
from app.core.errors import not_found
from app.core.tables import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=error_responses(401, 403))


def _out(row: ApiKey) -> KeyOut:
    return KeyOut(id=row.id, team=row.team.name, name=row.name, prefix=row.prefix, admin=row.is_admin,
                  created_at=row.created_at, revoked_at=row.revoked_at)


@router.post("", status_code=201, response_model=KeyCreated, responses=error_responses(422))
def create(body: KeyCreate, db: WriteDb, _: Admin) -> KeyCreated:
    row, key = create_key(db, body.team, body.name, is_admin=body.admin)
    db.commit()
    return KeyCreated(**_out(row).model_dump(), key=key)


@router.get("", response_model=list[KeyOut])
def list_keys(db: WriteDb, _: Admin) -> list[KeyOut]:
    return [_out(r) for r in db.scalars(select(ApiKey).order_by(ApiKey.created_at))]


@router.delete("/{key_id}", status_code=204, responses=error_responses(404))
def revoke(key_id: str, db: WriteDb, _: Admin) -> None:
    row = db.get(ApiKey, key_id)
    if row is None:
        raise not_found("key", key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        db.commit()
    forget_key(row.id)
