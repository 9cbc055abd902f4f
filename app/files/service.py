"""Uploaded models and datasets: screen, then store the blob and insert its row under the digest's lock."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.blobs import references
from app.blobs.store import BlobStore
from app.core.auth import Principal, owned
from app.core.config import Settings
from app.core.db import new_id, utcnow
from app.core.errors import APIError, not_found
from app.core.tables import DatasetFile, ModelFile
from app.files import screening
from app.files.receive import Received

FileRow = type[ModelFile] | type[DatasetFile]
KIND_BY_ROW = {ModelFile: "model", DatasetFile: "dataset"}
ID_PREFIX = {ModelFile: "mdl", DatasetFile: "ds"}
MAX_NAME = 255


def _clean_name(name: str | None, fallback: str) -> str:
    name = (name or "").strip() or fallback
    # Names are labels, never paths: keep the last path component and printable characters only.
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    if not name:
        name = fallback
    if len(name) > MAX_NAME:
        raise APIError(422, "invalid_name", f"name longer than {MAX_NAME} characters", {"field": "name"})
    return name


async def store_upload(db: Session, store: BlobStore, settings: Settings, principal: Principal, row_type: FileRow,
                       received: Received, name: str | None) -> ModelFile | DatasetFile:
    try:
        # In a child process with a time budget: never on the thread pool that serves the synchronous routes.
        sniffed = await screening.screen(KIND_BY_ROW[row_type], received.path,
                                         max_unpacked_bytes=settings.max_unpacked_bytes,
                                         max_entries=settings.max_zip_entries, timeout_s=settings.screening_timeout_s,
                                         memory_bytes=settings.screening_memory_bytes,
                                         concurrency=settings.screening_concurrency)
    except screening.ScreeningError as exc:
        received.path.unlink(missing_ok=True)
        raise APIError(exc.status, exc.code, exc.message, exc.details) from None
    except BaseException:
        received.path.unlink(missing_ok=True)
        raise
    try:
        row = row_type(id=new_id(ID_PREFIX[row_type]), team_id=principal.team_id,
                       name=_clean_name(name or received.filename, f"{KIND_BY_ROW[row_type]}.{sniffed.kind}"),
                       format=sniffed.kind, sha256=received.sha256, size_bytes=received.size,
                       details=sniffed.details)
        await run_in_threadpool(_record, db, store, row, received.path)
    finally:
        received.path.unlink(missing_ok=True)
    return row


def _spare(src: Path) -> Path:
    """A second name for the upload's bytes (`put_file` consumes `src`): a hard link, a copy where there are none."""
    spare = src.with_name(f"{src.name}.spare")
    try:
        os.link(src, spare)
    except OSError:
        shutil.copyfile(src, spare)
    return spare


def _record(db: Session, store: BlobStore, row: ModelFile | DatasetFile, src: Path) -> None:
    """Puts the blob (the transfer runs without a lock), then commits its row under the digest's lock
    (`references.lock`), putting the bytes again if a release freed the blob in between: a release that comes later
    sees the row."""
    spare = _spare(src)
    try:
        store.put_file(src, row.sha256)
        references.lock(db, row.sha256)
        if not store.exists(row.sha256):
            store.put_file(spare, row.sha256)
        db.add(row)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        spare.unlink(missing_ok=True)


def get_owned(db: Session, principal: Principal, row_type: FileRow, ident: str) -> ModelFile | DatasetFile:
    row = owned(db.get(row_type, ident), principal)
    if row is None:
        raise not_found(KIND_BY_ROW[row_type], ident)
    return row


def list_owned(db: Session, principal: Principal, row_type: FileRow, limit: int, after: str | None,
               sha256: str | None = None) -> tuple[list[ModelFile | DatasetFile], bool]:
    q = select(row_type).where(row_type.team_id == principal.team_id, row_type.deleted_at.is_(None))
    if sha256:
        q = q.where(row_type.sha256 == sha256)
    if after:
        q = q.where(row_type.id < after)
    rows = list(db.scalars(q.order_by(row_type.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_owned(db: Session, store: BlobStore, principal: Principal, row_type: FileRow, ident: str) -> None:
    """Hides the row; frees the blob unless something still refers to it (`references.in_use`)."""
    row = get_owned(db, principal, row_type, ident)
    row.deleted_at = utcnow()
    db.commit()
    references.release(db, store, [row.sha256])
