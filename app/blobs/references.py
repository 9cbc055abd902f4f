"""When a stored blob may go. The store is content-addressed: one blob can back uploads of several teams, the
artifacts of several jobs (an artifact downloaded and uploaded again as a model is the same blob), and a model or
dataset whose row was deleted while jobs still used it. A blob is freed only when nothing refers to it.

Freeing (check unused, delete) and recording (check the blob is stored, insert the row that refers to it) hold the
digest's lock (`lock`) in the database, so they never interleave, whichever API or worker process runs them: an
upload of the same bytes that lands while a blob is being freed either commits its row first (the release sees it)
or finds the blob gone and puts it again (app/files/service.py); a job's artifact found gone fails the job
(`lifecycle.finish`)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.blobs.store import BlobStore
from app.core.tables import Artifact, DatasetFile, Job, ModelFile
from app.jobs.states import TERMINAL_STATUSES
from app.recipes import teacher_model_ids


def in_use(db: Session, sha256: str) -> bool:
    for table in (ModelFile, DatasetFile):  # an upload that is still listed
        if db.scalar(select(table.id).where(table.sha256 == sha256, table.deleted_at.is_(None)).limit(1)):
            return True
    if db.scalar(select(Artifact.id).where(Artifact.sha256 == sha256).limit(1)):
        return True
    model_ids = set(db.scalars(select(ModelFile.id).where(ModelFile.sha256 == sha256)))
    # A deleted model stays with every job made from it (its report and rerun name it) until those jobs are deleted.
    if model_ids and db.scalar(select(Job.id).where(Job.model_id.in_(model_ids)).limit(1)):
        return True
    # A deleted dataset or teacher is still read by a job that has not finished.
    needed_by_active = model_ids | set(db.scalars(select(DatasetFile.id).where(DatasetFile.sha256 == sha256)))
    if needed_by_active:
        for datasets, recipe in db.execute(select(Job.datasets, Job.recipe).where(
                Job.status.not_in(TERMINAL_STATUSES))):
            if needed_by_active & {*(datasets or {}).values(), *teacher_model_ids(recipe)}:
                return True
    return False


def lock(db: Session, sha256: str) -> None:
    """Holds the digest's lock until the session's transaction ends. PostgreSQL: a transaction-level advisory lock
    keyed by the digest (other digests go on). SQLite: the database's write lock (BEGIN IMMEDIATE; a transaction
    that already wrote holds it), which every writing process takes in turn."""
    conn = db.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(sha256)})
    elif not conn.connection.driver_connection.in_transaction:  # pysqlite opens a transaction at its first write
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _lock_key(sha256: str) -> int:
    return int.from_bytes(bytes.fromhex(sha256[:16]), "big", signed=True)  # a bigint; a collision only waits


def release(db: Session, store: BlobStore, digests: Iterable[str]) -> None:
    """Deletes each blob nothing refers to any more (call after committing the change that let it go). The check
    and the delete hold the digest's lock: a row recorded for the same bytes meanwhile keeps the blob."""
    for sha256 in dict.fromkeys(digests):
        lock(db, sha256)
        try:
            if not in_use(db, sha256):
                store.delete(sha256)
        finally:
            db.rollback()  # nothing was written here: ends the transaction, which releases the lock
