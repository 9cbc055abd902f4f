"""Tenant isolation, walked over every route of the app: a new endpoint is covered without editing this file.

Team alpha owns a model, a dataset, a job (with an artifact), a sweep and a webhook. With team beta's key, every
method and path that names one of alpha's ids answers 404 (never 200, 403 or 500), and the routes without ids
leak none of alpha's ids. A revoked key and no key get 401 on every route that is not deliberately public.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from fastapi.routing import iter_route_contexts

from tests.app.api.routes.test_api import npz_bytes, tiny_onnx, upload_model
from tests.conftest import new_team_key

HOOK = "https://hooks.example.invalid/hook"
# Routes anyone may call: probes, the dashboard's static page (it holds no data) and the API docs.
PUBLIC = {"/healthz", "/readyz", "/", "/dashboard", "/dashboard/static/{name}", "/openapi.json",
          "/docs", "/docs/static/{name}", "/redoc"}
# Admin-only routes: another team's key is refused with 403 (the resource is not secret; the right is missing).
# /metrics counts every team's jobs: an admin key or the scraper's SQUEEZE_METRICS_TOKEN.
ADMIN_ONLY = {"/v1/keys", "/v1/keys/{key_id}", "/metrics"}


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _routes(app) -> list[tuple[str, str]]:
    out = []
    for route in iter_route_contexts(app.routes):  # FastAPI's included routers, flattened
        for method in sorted(route.methods or ()):
            if method != "HEAD" and route.path:
                out.append((method, route.path))
    return out


@pytest.fixture
def world(api, configured):
    """Alpha's objects, beta's key and a revoked key of alpha."""
    alpha, beta = new_team_key(api, "alpha"), new_team_key(api, "beta")
    a = _as(alpha)
    model = upload_model(api, tiny_onnx(), headers=a).json()
    ds = api.post("/v1/datasets", params={"name": "d.npz"}, headers=a,
                  content=npz_bytes(x=np.zeros((4, 4), np.float32), labels=np.zeros(4, np.int64))).json()
    job = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}, headers=a)
    assert job.status_code == 202, job.text
    job = job.json()
    sweep = api.post("/v1/sweeps", headers=a, json={
        "model_id": model["id"], "recipe": {"steps": [{"type": "prune", "sparsity": 0.5}]},
        "grid": {"steps[0].sparsity": [0.3, 0.5]}, "objective": "smallest"})
    assert sweep.status_code == 202, sweep.text
    hook = api.post("/v1/webhooks", json={"url": HOOK, "events": ["completed"]}, headers=a)
    assert hook.status_code == 201, hook.text

    # An artifact of alpha's job (a worker would add it; its blob is the model's, already stored).
    from app.core.db import new_id, session_scope
    from app.core.tables import Artifact

    with session_scope() as db:
        db.add(Artifact(id=new_id("art"), job_id=job["id"], name="report.json", format="json",
                        size_bytes=model["size_bytes"], sha256=model["sha256"]))
        db.commit()

    revoked = api.post("/v1/keys", json={"team": "alpha", "name": "old"}).json()
    assert api.delete(f"/v1/keys/{revoked['id']}").status_code == 204
    ids = {"model": model["id"], "dataset": ds["id"], "job": job["id"], "sweep": sweep.json()["id"],
           "webhook": hook.json()["id"], "key": revoked["id"], "team": "alpha"}
    return {"alpha": alpha, "beta": beta, "revoked": revoked["key"], "ids": ids}


def _fill(path: str, ids: dict[str, str]) -> str:
    """Puts alpha's id for each path parameter; a route with a parameter this test does not know fails here, so
    a new endpoint gets an id (and isolation coverage) rather than being skipped."""
    def value(m: re.Match) -> str:
        param = m.group(1)
        if param == "ident":
            return ids["dataset"] if path.startswith("/v1/datasets") else ids["model"]
        if param == "name":
            if path.startswith("/v1/jobs"):
                return "report.json"
            return "swagger-ui.css" if path.startswith("/docs") else "dashboard.js"
        kind = param.removesuffix("_id")
        assert kind in ids, f"{path}: no id of alpha for path parameter {param!r}; add one to the world fixture"
        return ids[kind]
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", value, path)


def _body(method: str, path: str, ids: dict[str, str]) -> dict | None:
    """A valid body that names alpha's objects, for the routes without a path id that take one."""
    if method != "POST":
        return None
    if path == "/v1/jobs":
        return {"model_id": ids["model"], "recipe": "prune-50"}
    if path == "/v1/sweeps":
        return {"model_id": ids["model"], "recipe": {"steps": [{"type": "prune", "sparsity": 0.5}]},
                "grid": {"steps[0].sparsity": [0.3, 0.5]}, "objective": "smallest"}
    return {}


def test_every_route_isolates_teams(api, world):
    ids, beta, alpha = world["ids"], _as(world["beta"]), _as(world["alpha"])
    walked = 0
    for method, template in _routes(api.app):
        if template in PUBLIC:
            continue
        path = _fill(template, ids)
        r = api.request(method, path, headers=beta, json=_body(method, template, ids))
        walked += 1
        if template in ADMIN_ONLY:
            assert r.status_code == 403, (method, template, r.status_code, r.text)
            continue
        if "{" in template:
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "not_found"
            if method == "GET":  # the id is alpha's and real: alpha itself gets it
                assert api.get(path, headers=alpha).status_code == 200, (path, "alpha")
        elif template in ("/v1/jobs", "/v1/sweeps") and method == "POST":
            assert r.status_code == 404, (method, template, r.status_code, r.text)  # alpha's model is not beta's
        else:
            assert r.status_code < 500 and r.status_code != 403, (method, template, r.status_code, r.text)
            # the team's name is a word ("alpha" is also a distill option in the presets), not an id
            leaked = [k for k, v in ids.items() if k not in ("key", "team") and v in r.text]
            assert not leaked, (method, template, leaked)
    assert walked >= 25  # the walk saw the API, not an empty router list
    # beta's DELETEs and cancels changed nothing of alpha's
    assert api.get(f"/v1/models/{ids['model']}", headers=alpha).status_code == 200
    assert api.get(f"/v1/datasets/{ids['dataset']}", headers=alpha).status_code == 200
    assert api.get(f"/v1/jobs/{ids['job']}", headers=alpha).json()["status"] == "queued"
    assert [h["id"] for h in api.get("/v1/webhooks", headers=alpha).json()["data"]] == [ids["webhook"]]


@pytest.mark.parametrize("who", ["revoked", "none", "garbage"])
def test_every_private_route_needs_a_live_key(api, world, who):
    headers = {"revoked": _as(world["revoked"]), "none": {"Authorization": ""},
               "garbage": {"Authorization": "Bearer sqz_" + "A" * 43}}[who]
    for method, template in _routes(api.app):
        if template in PUBLIC:
            continue
        r = api.request(method, _fill(template, world["ids"]), headers=headers,
                        json=_body(method, template, world["ids"]))
        assert r.status_code == 401, (who, method, template, r.status_code, r.text)
        assert r.json()["error"]["code"] == "unauthorized"


def test_public_routes_are_only_the_listed_ones(api):
    """A route reachable without a key must be listed in PUBLIC on purpose."""
    templates = {t for _, t in _routes(api.app)}
    assert PUBLIC - templates == set(), "PUBLIC lists routes that no longer exist"
    for method, template in _routes(api.app):
        if template in PUBLIC:
            continue
        r = api.request(method, _fill(template, {"model": "m", "dataset": "d", "job": "j", "sweep": "s",
                                                 "webhook": "w", "key": "k", "team": "t"}),
                        headers={"Authorization": ""})
        assert r.status_code == 401, (method, template, r.status_code)


def test_keys_are_stored_as_sha256_only(api, configured):
    """The api_keys table holds a digest and an 8-character display prefix; no column holds the key."""
    import hashlib

    from sqlalchemy import inspect, select

    from app.core.db import get_engine, session_scope
    from app.core.tables import ApiKey

    key = new_team_key(api, "hashy")
    columns = {c["name"] for c in inspect(get_engine()).get_columns("api_keys")}
    with session_scope() as db:
        rows = [dict(r._mapping) for r in db.execute(select(*ApiKey.__table__.columns))]
    mine = next(r for r in rows if r["key_hash"] == hashlib.sha256(key.encode()).hexdigest())
    assert mine["prefix"] == key[:8]
    for col in columns:
        assert key not in str(mine[col]) or col == "prefix", col
        assert key[8:] not in str(mine[col]), col
