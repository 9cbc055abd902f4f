"""Per-team running-jobs limit (SQUEEZE_TEAM_MAX_RUNNING, 2 by default; a team's own max_running set by an admin
wins): a claim past it leaves the job queued and says so, and other teams' jobs start at once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from app.core.auth import create_key
from app.core.db import new_id, session_scope, utcnow
from app.core.tables import Job, ModelFile
from app.jobs import lifecycle


def _jobs(db, team: str, n: int) -> list[str]:
    key, _ = create_key(db, team, "k")
    model = ModelFile(id=new_id("mdl"), team_id=key.team_id, name="m", format="onnx", sha256="0" * 64, size_bytes=1)
    db.add(model)
    db.flush()
    ids = []
    for _ in range(n):
        job = Job(id=new_id("job"), team_id=key.team_id, model_id=model.id, recipe={}, outputs=["onnx"],
                  queue="gpu", enqueued_at=utcnow() - timedelta(seconds=120))
        db.add(job)
        ids.append(job.id)
    db.commit()
    return ids


def test_claims_past_the_limit_are_deferred_and_other_teams_are_not(configured):
    with session_scope() as db:
        a1, a2, a3 = _jobs(db, "alpha", 3)
        (b1,) = _jobs(db, "beta", 1)
        first = lifecycle.claim(db, a1, "w1", team_limit=2)
        second = lifecycle.claim(db, a2, "w2", team_limit=2)
        assert first is not None and second is not None
        with pytest.raises(lifecycle.TeamBusy) as busy:
            lifecycle.claim(db, a3, "w3", team_limit=2)
        assert busy.value.queue == "gpu"
        job = db.get(Job, a3)
        db.refresh(job)
        assert job.status == "queued" and job.attempts == 0 and job.stage == lifecycle.TEAM_WAIT_STAGE
        # enqueued_at is fresh: the reaper leaves the deferred message alone instead of sending a duplicate
        assert job.enqueued_at > utcnow() - timedelta(seconds=10)
        sent: list[str] = []
        lifecycle.reap(db, send=lambda j, q, p: sent.append(j), heartbeat_timeout_s=30, requeue_after_s=60,
                       max_attempts=3)
        assert sent == [b1]  # only the other team's old, unclaimed job
        assert lifecycle.claim(db, b1, "w4", team_limit=2) is not None  # another team's job runs
        assert lifecycle.finish(db, a1, first.lease, lifecycle.Outcome("succeeded")) == "succeeded"
        third = lifecycle.claim(db, a3, "w3", team_limit=2)
        assert third is not None and third.attempt == 1
        assert lifecycle.claim(db, a3, "w5", team_limit=2) is None  # a redelivery is still a no-op
        assert lifecycle.claim(db, "job_missing", "w5", team_limit=2) is None


def test_no_limit_when_neither_the_server_nor_the_team_sets_one(configured):
    with session_scope() as db:
        ids = _jobs(db, "gamma", 4)
        assert all(lifecycle.claim(db, j, "w") is not None for j in ids)


def _claim_as_a_worker(job_id: str):
    """What worker/tasks.py does: the server's default limit, SQUEEZE_TEAM_MAX_RUNNING."""
    from app.core.config import get_settings

    with session_scope() as db:
        return lifecycle.claim(db, job_id, "w", team_limit=get_settings().team_max_running)


def test_the_default_limit_is_on_and_an_admin_sets_a_teams_own(api):
    from app.core.config import get_settings

    assert get_settings().team_max_running == 2
    with session_scope() as db:
        a = _jobs(db, "alpha", 4)
        (b1,) = _jobs(db, "beta", 1)
    assert _claim_as_a_worker(a[0]) is not None and _claim_as_a_worker(a[1]) is not None
    with pytest.raises(lifecycle.TeamBusy):
        _claim_as_a_worker(a[2])
    assert _claim_as_a_worker(b1) is not None  # beta starts at once while alpha waits
    r = api.patch("/v1/teams/alpha/limits", json={"max_running": 3})
    assert r.status_code == 200 and r.json()["usage"]["running"] == 2, r.text
    assert _claim_as_a_worker(a[2]) is not None
    with pytest.raises(lifecycle.TeamBusy):
        _claim_as_a_worker(a[3])
    assert api.patch("/v1/teams/alpha/limits", json={"max_running": 0}).status_code == 200  # no limit for alpha
    assert _claim_as_a_worker(a[3]) is not None
    assert api.get("/v1/teams/beta/limits").json()["max_running"] == 2  # beta keeps the server's default


@pytest.mark.parametrize("backend_name", ["postgres"])
def test_concurrent_claims_never_exceed_the_limit(configured):
    with session_scope() as db:
        ids = _jobs(db, "delta", 12)
    outcomes: list[str] = []
    barrier = threading.Barrier(len(ids))

    def take(job_id: str) -> None:
        barrier.wait()
        try:
            with session_scope() as db:
                outcomes.append("claimed" if lifecycle.claim(db, job_id, "w", team_limit=3) else "none")
        except lifecycle.TeamBusy:
            outcomes.append("deferred")

    threads = [threading.Thread(target=take, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("claimed") == 3 and outcomes.count("deferred") == 9, outcomes
    with session_scope() as db:
        assert sum(db.get(Job, j).status == "running" for j in ids) == 3
