"""The job state machine on the real database: claims, leases, the reaper."""

from __future__ import annotations

from datetime import timedelta

from app.core.auth import create_key
from app.core.db import new_id, session_scope, utcnow
from app.core.tables import Job, ModelFile
from app.jobs import lifecycle

SETTINGS = {"heartbeat_timeout_s": 10, "requeue_after_s": 30, "max_attempts": 2}


def _job(db) -> str:
    key, _ = create_key(db, "lc", "k")
    model = ModelFile(id=new_id("mdl"), team_id=key.team_id, name="m", format="onnx", sha256="0" * 64, size_bytes=1)
    db.add(model)
    db.flush()
    job = Job(id=new_id("job"), team_id=key.team_id, model_id=model.id, recipe={}, outputs=["onnx"], queue="cpu",
              enqueued_at=utcnow())
    db.add(job)
    db.commit()
    return job.id


def test_claim_once_and_only_the_lease_holder_records(configured):
    with session_scope() as db:
        job_id = _job(db)
        first = lifecycle.claim(db, job_id, "w1")
        assert first is not None and first.attempt == 1
        assert lifecycle.claim(db, job_id, "w2") is None  # a redelivery is a no-op
        assert lifecycle.heartbeat(db, job_id, "not-the-lease", progress=0.5) is None
        assert lifecycle.heartbeat(db, job_id, first.lease, progress=0.5, stage="steps[0].prune") == "running"
        assert lifecycle.finish(db, job_id, "not-the-lease", lifecycle.Outcome("succeeded")) is None
        assert lifecycle.finish(db, job_id, first.lease, lifecycle.Outcome("succeeded")) == "succeeded"
        assert lifecycle.finish(db, job_id, first.lease, lifecycle.Outcome("failed")) is None
        job = db.get(Job, job_id)
        db.refresh(job)
        assert job.status == "succeeded" and job.progress == 1.0


def test_cancel_requested_while_running_wins_over_a_result(configured):
    with session_scope() as db:
        job_id = _job(db)
        claim = lifecycle.claim(db, job_id, "w1")
        db.get(Job, job_id).status = "canceling"
        db.commit()
        assert lifecycle.heartbeat(db, job_id, claim.lease) == "canceling"
        assert lifecycle.finish(db, job_id, claim.lease, lifecycle.Outcome("succeeded")) == "canceled"


def test_reaper_requeues_then_gives_up_and_resends_unclaimed(configured):
    sent = []
    with session_scope() as db:
        job_id = _job(db)
        lease = lifecycle.claim(db, job_id, "w1").lease
        db.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
        db.commit()
        counts = lifecycle.reap(db, send=lambda j, q, p: sent.append(j), **SETTINGS)
        assert counts["requeued"] == 1 and sent == [job_id]
        assert lifecycle.heartbeat(db, job_id, lease) is None  # the old attempt lost its lease
        lifecycle.claim(db, job_id, "w2")
        db.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
        db.commit()
        counts = lifecycle.reap(db, send=lambda j, q, p: sent.append(j), **SETTINGS)
        job = db.get(Job, job_id)
        db.refresh(job)
        assert counts["failed"] == 1 and job.status == "failed" and job.error_code == "worker_lost"

        queued = _job(db)
        assert lifecycle.reap(db, send=lambda j, q, p: sent.append(j), **SETTINGS)["resent"] == 0
        db.get(Job, queued).enqueued_at = utcnow() - timedelta(seconds=120)
        db.commit()
        assert lifecycle.reap(db, send=lambda j, q, p: sent.append(j), **SETTINGS)["resent"] == 1
        assert sent[-1] == queued
