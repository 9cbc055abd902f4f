"""The task's last write retries while the database is unreachable (the e2e restart test covers heartbeats; this is
the short window between the last heartbeat and `finish`)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from worker import tasks

SETTINGS = SimpleNamespace(heartbeat_timeout_s=5.0, heartbeat_interval_s=0.01)


@pytest.fixture
def no_session(monkeypatch):
    monkeypatch.setattr(tasks, "session_scope", lambda: contextlib.nullcontext(None))


def test_finish_retries_until_the_database_answers(monkeypatch, no_session):
    calls = []

    def finish(db, job_id, lease, outcome):
        calls.append(job_id)
        if len(calls) < 3:
            raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))
        return "succeeded"

    monkeypatch.setattr(tasks.lifecycle, "finish", finish)
    assert tasks._finish("job_1", "lease", object(), SETTINGS) == "succeeded"
    assert len(calls) == 3


def test_finish_gives_up_past_the_heartbeat_timeout(monkeypatch, no_session):
    def finish(*_):
        raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))

    monkeypatch.setattr(tasks.lifecycle, "finish", finish)
    with pytest.raises(OperationalError):
        tasks._finish("job_1", "lease", object(), SimpleNamespace(heartbeat_timeout_s=0.05, heartbeat_interval_s=0.01))


def test_finish_does_not_retry_an_error_about_the_data(monkeypatch, no_session):
    calls = []

    def finish(*_):
        calls.append(1)
        raise IntegrityError("INSERT artifacts", {}, Exception("duplicate key"))

    monkeypatch.setattr(tasks.lifecycle, "finish", finish)
    with pytest.raises(IntegrityError):
        tasks._finish("job_1", "lease", object(), SETTINGS)
    assert calls == [1]
