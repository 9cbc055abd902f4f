"""Freeing a content-addressed blob while the same bytes are being recorded again (app/blobs/references.py): the
"unused" check and the delete hold the digest's database lock, and so does an upload's put and row insert; a job's
artifact rows are recorded only after checking their blobs under the same lock. On SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from app.blobs import references
from app.blobs.store import make_store
from app.core.db import session_scope
from app.core.tables import Artifact, Job
from app.jobs import lifecycle
from tests.app.api.routes.test_api import tiny_onnx, upload_model
from tests.app.jobs.test_lifecycle import _job as queued_job


def test_an_upload_landing_while_its_blob_is_freed_keeps_its_blob(api, monkeypatch):
    """DELETE of the only model holding some bytes, and an upload of the same bytes run at the worst moment: after
    the release found the blob unused, before it deletes it."""
    data = tiny_onnx()
    first = upload_model(api, data, name="first.onnx").json()
    real_in_use, real_lock = references.in_use, references.lock
    armed, at_lock, answers = threading.Event(), threading.Event(), []

    def lock(db, sha256):
        if armed.is_set():
            at_lock.set()  # the upload reached the digest's lock (it waits there while the release holds it)
        real_lock(db, sha256)

    def upload() -> None:
        answers.append(upload_model(api, data, name="second.onnx"))

    def in_use_then_upload(db, sha256):
        unused = real_in_use(db, sha256)
        if not armed.is_set():
            armed.set()
            racer = threading.Thread(target=upload)
            racer.start()
            # Without the lock the upload runs to its end here: its put finds the blob and its row commits.
            while not (at_lock.is_set() or not racer.is_alive()):
                racer.join(0.05)
            threads.append(racer)
        return unused

    threads: list[threading.Thread] = []
    monkeypatch.setattr(references, "lock", lock)
    monkeypatch.setattr(references, "in_use", in_use_then_upload)
    assert api.delete(f"/v1/models/{first['id']}").status_code == 204
    threads[0].join(60)
    assert at_lock.is_set()
    (second,) = answers
    assert second.status_code == 201, second.text
    assert second.json()["sha256"] == first["sha256"]
    r = api.get(f"/v1/models/{second.json()['id']}/file")
    assert r.status_code == 200, r.text
    assert r.content == data
    assert make_store().exists(first["sha256"])


def test_a_free_without_a_landing_upload_still_deletes(api):
    model = upload_model(api, tiny_onnx()).json()
    assert make_store().exists(model["sha256"])
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert not make_store().exists(model["sha256"])


def _running_job(db) -> tuple[str, str]:
    job_id = queued_job(db)
    return job_id, lifecycle.claim(db, job_id, "w1").lease


def _put(tmp_path, data: bytes) -> str:
    import hashlib

    src = tmp_path / "blob"
    src.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    make_store().put_file(src, sha256)
    return sha256


@pytest.mark.parametrize("freed", [False, True])
def test_finish_records_artifacts_only_while_their_blobs_are_stored(configured, tmp_path, freed):
    """The worker put its artifact's blob; a release of the same bytes may free it before `finish` records the row
    (the window is the rest of the job): then the job fails with artifact_lost and has no dangling artifact row."""
    sha256 = _put(tmp_path, b"artifact bytes")
    if freed:
        make_store().delete(sha256)  # what a release that ran in the window did
    artifact = {"name": "model.onnx", "format": "onnx", "size_bytes": 14, "sha256": sha256}
    with session_scope() as db:
        job_id, lease = _running_job(db)
        outcome = lifecycle.Outcome("succeeded", metrics={"ratios": {}}, artifacts=[artifact])
        assert lifecycle.finish(db, job_id, lease, outcome) == ("failed" if freed else "succeeded")
        job = db.get(Job, job_id)
        db.refresh(job)
        rows = list(db.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
    if freed:
        assert (job.error_code, rows) == ("artifact_lost", [])
        assert "model.onnx" in job.error_message and job.metrics == {"ratios": {}}
    else:
        assert (job.error_code, rows) == (None, ["model.onnx"])


def test_the_lock_serializes_two_sessions_on_one_digest(configured):
    """Across connections (as across processes): a second holder of a digest's lock waits for the first's commit."""
    sha256 = "ab" * 32
    order: list[str] = []
    with session_scope() as first:
        references.lock(first, sha256)

        def second() -> None:
            with session_scope() as db:
                references.lock(db, sha256)
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        t.join(1.0)
        order.append("first")
        assert t.is_alive()  # still waiting
    t.join(30)
    assert order == ["first", "second"]
