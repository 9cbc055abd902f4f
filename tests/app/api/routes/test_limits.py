"""Fairness between teams through HTTP (SQLite and PostgreSQL): queued-jobs, upload-rate and storage quotas (429 with
Retry-After), the team's maximum priority (422) raised per team by an admin, and the caps on a recipe's lists."""

from __future__ import annotations

import pytest

from tests.app.api.routes.test_api import npz_bytes, tiny_onnx, upload_model
from tests.conftest import new_team_key

PRUNE = {"steps": [{"type": "prune", "sparsity": 0.5}], "evaluate": {"batch_sizes": [1], "repeats": 2}}


@pytest.fixture
def limit(monkeypatch):
    """Sets server defaults (SQUEEZE_TEAM_*) for the rest of the test."""
    from app.core.config import get_settings

    def set_(**values: int) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"SQUEEZE_TEAM_{name.upper()}", str(value))
        get_settings.cache_clear()

    return set_


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _over(r, code: str, limit: str, value: int) -> dict:
    """A 429 in the standard error shape, naming the limit and its value, with Retry-After."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["details"]["limit"] == limit and error["details"]["value"] == value
    assert limit in error["message"] and str(value) in error["message"]
    assert int(r.headers["retry-after"]) == error["details"]["retry_after_s"] >= 1
    return error


def test_limits_are_on_by_default_and_a_team_reads_its_own(api):
    from app.core.config import get_settings

    settings = get_settings()
    assert (settings.team_max_running, settings.team_max_queued, settings.team_uploads_per_minute,
            settings.team_max_priority, settings.team_max_upload_bytes) == (2, 100, 30, 5, 50 * 1024**3)
    key = new_team_key(api, "reader")
    upload_model(api, tiny_onnx(), headers=_as(key))
    r = api.get("/v1/teams/reader/limits", headers=_as(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["max_running"], body["max_queued"], body["max_priority"], body["overridden"]) == (2, 100, 5, [])
    assert body["usage"] == {"running": 0, "queued": 0, "upload_bytes": len(tiny_onnx()), "uploads_last_minute": 1}
    new_team_key(api, "other")
    assert api.get("/v1/teams/other/limits", headers=_as(key)).status_code == 404  # another team's: not found
    assert api.get("/v1/teams/other/limits").status_code == 200  # an admin reads any team's


def test_queued_jobs_past_the_limit_are_a_429_and_a_sweep_is_refused_whole(api, limit):
    limit(max_queued=3)
    key = new_team_key(api, "busy")
    model = upload_model(api, tiny_onnx(), headers=_as(key)).json()
    submit = {"model_id": model["id"], "recipe": PRUNE}
    ids = [api.post("/v1/jobs", json=submit, headers=_as(key)).json()["id"] for _ in range(3)]
    error = _over(api.post("/v1/jobs", json=submit, headers=_as(key)), "quota_exceeded", "max_queued", 3)
    assert error["details"]["current"] == 3
    _over(api.post(f"/v1/jobs/{ids[0]}/rerun", headers=_as(key)), "quota_exceeded", "max_queued", 3)
    other = new_team_key(api, "calm")  # another team is not held back
    theirs = upload_model(api, tiny_onnx(), headers=_as(other)).json()
    assert api.post("/v1/jobs", json={**submit, "model_id": theirs["id"]}, headers=_as(other)).status_code == 202
    for job_id in ids[:2]:
        api.post(f"/v1/jobs/{job_id}/cancel", headers=_as(key))
    sweep = {"model_id": model["id"], "recipe": PRUNE, "objective": "smallest",
             "grid": {"steps[0].sparsity": [0.3, 0.5, 0.7]}}
    _over(api.post("/v1/sweeps", json=sweep, headers=_as(key)), "quota_exceeded", "max_queued", 3)
    assert api.get("/v1/sweeps", headers=_as(key)).json()["data"] == []  # nothing of the refused sweep
    assert len(api.get("/v1/jobs", params={"status": "queued"}, headers=_as(key)).json()["data"]) == 1
    sweep["grid"] = {"steps[0].sparsity": [0.3, 0.5]}
    assert api.post("/v1/sweeps", json=sweep, headers=_as(key)).status_code == 202


def test_uploads_per_minute_past_the_limit_are_a_429(api, limit):
    limit(uploads_per_minute=2)
    key = new_team_key(api, "eager")
    assert upload_model(api, tiny_onnx(), headers=_as(key)).status_code == 201
    data = npz_bytes(x=[[1.0, 2.0]])
    assert api.post("/v1/datasets", params={"name": "d.npz"}, content=data, headers=_as(key)).status_code == 201
    r = api.post("/v1/datasets", params={"name": "d.npz"}, content=data, headers=_as(key))
    assert _over(r, "rate_limited", "uploads_per_minute", 2)["details"]["retry_after_s"] <= 60
    assert upload_model(api, tiny_onnx(), headers=_as(key)).status_code == 429  # models and datasets together
    assert upload_model(api, tiny_onnx()).status_code == 201  # the admin's team has its own minute


def test_stored_bytes_past_the_quota_are_a_429_and_nothing_is_kept(api, limit, configured):
    from app.core.config import get_settings

    size = len(tiny_onnx())
    limit(max_upload_bytes=2 * size + 10)
    key = new_team_key(api, "hoarder")
    first = upload_model(api, tiny_onnx(), headers=_as(key)).json()
    assert upload_model(api, tiny_onnx(), name="b.onnx", headers=_as(key)).status_code == 201
    error = _over(upload_model(api, tiny_onnx(), name="c.onnx", headers=_as(key)), "quota_exceeded",
                  "max_upload_bytes", 2 * size + 10)
    assert error["details"]["current"] == 2 * size and "delete" in error["message"]
    assert len(api.get("/v1/models", headers=_as(key)).json()["data"]) == 2
    assert not list(get_settings().tmp_dir.glob("upload-*"))  # the refused body is not left behind
    assert api.delete(f"/v1/models/{first['id']}", headers=_as(key)).status_code == 204
    assert upload_model(api, tiny_onnx(), name="c.onnx", headers=_as(key)).status_code == 201


def test_priority_above_the_team_maximum_is_a_422_until_an_admin_raises_it(api):
    key = new_team_key(api, "urgent")
    model = upload_model(api, tiny_onnx(), headers=_as(key)).json()
    submit = {"model_id": model["id"], "recipe": PRUNE, "priority": 9}
    r = api.post("/v1/jobs", json=submit, headers=_as(key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "priority_not_allowed", r.text
    error = r.json()["error"]
    assert error["details"]["errors"][0]["field"] == "priority" and error["details"]["max_priority"] == 5
    assert "maximum priority 5" in error["message"]
    assert api.post("/v1/jobs", json={**submit, "priority": 5}, headers=_as(key)).status_code == 202
    r = api.patch("/v1/teams/urgent/limits", json={"max_priority": 9}, headers=_as(key))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"  # a team cannot raise its own
    r = api.patch("/v1/teams/urgent/limits", json={"max_priority": 9, "max_running": 4})
    assert r.status_code == 200, r.text
    assert (r.json()["max_priority"], r.json()["max_running"], sorted(r.json()["overridden"])) == \
        (9, 4, ["max_priority", "max_running"])
    accepted = api.post("/v1/jobs", json=submit, headers=_as(key))
    assert accepted.status_code == 202 and accepted.json()["priority"] == 9
    r = api.patch("/v1/teams/urgent/limits", json={"max_priority": None})  # back to the server's default
    assert r.json()["max_priority"] == 5 and r.json()["overridden"] == ["max_running"]
    assert api.post("/v1/jobs", json=submit, headers=_as(key)).status_code == 422


def test_team_limits_route_refuses_bad_requests(api):
    new_team_key(api, "known")
    assert api.patch("/v1/teams/nobody/limits", json={"max_priority": 9}).status_code == 404
    for body, field in (({"max_priority": 10}, "max_priority"), ({"max_running": -1}, "max_running"),
                        ({"max_queued": False}, "max_queued"), ({"max_jobs": 3}, "max_jobs")):
        r = api.patch("/v1/teams/known/limits", json=body)
        assert r.status_code == 422 and r.json()["error"]["details"]["errors"][0]["field"] == field, r.text


@pytest.mark.parametrize("evaluate, step, outputs, field", [
    ({"batch_sizes": list(range(1, 10))}, {}, None, "recipe.evaluate.batch_sizes"),
    ({"batch_sizes": [1, 2048]}, {}, None, "recipe.evaluate.batch_sizes[1]"),
    ({"repeats": 201}, {}, None, "recipe.evaluate.repeats"),
    ({"runtimes": ["onnxruntime"] * 5}, {}, None, "recipe.evaluate.runtimes"),  # one more than there are runtimes
    ({}, {"targets": ["fc*"] * 257}, None, "recipe.steps[0].targets"),
    ({}, {"ignore": ["x" * 201]}, None, "recipe.steps[0].ignore[0]"),
    ({}, {}, ["onnx"] * 8, "recipe.outputs"),  # one more than there are output formats
])
@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)  # validation only: one backend is enough
def test_recipe_lists_are_capped(api, evaluate, step, outputs, field):
    model = upload_model(api, tiny_onnx()).json()
    recipe = {"steps": [{"type": "prune", "sparsity": 0.5, **step}], "evaluate": evaluate,
              **({"outputs": outputs} if outputs else {})}
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_recipe", r.text
    errors = r.json()["error"]["details"]["errors"]
    assert [e["field"] for e in errors] == [field], errors
    assert "at most" in errors[0]["message"] or "less than or equal" in errors[0]["message"]
