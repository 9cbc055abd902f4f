"""app/core/security.py over HTTP: security headers on every answer, CORS off unless configured, body caps, and no
secret in a log line or an error message."""

from __future__ import annotations

import logging

import pytest

from tests.app.api.routes.test_api import tiny_onnx, upload_model
from tests.conftest import new_team_key

EXPECTED = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


def _secure(r) -> None:
    for name, value in EXPECTED.items():
        assert r.headers.get(name) == value, (r.request.url, name, r.headers.get(name))
    assert r.headers.get("content-security-policy"), r.request.url


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_security_headers_on_every_kind_of_answer(api):
    model = upload_model(api, tiny_onnx()).json()
    answers = [
        api.get("/healthz"), api.get("/metrics"), api.get("/openapi.json"), api.get("/v1/models"),
        api.get(f"/v1/models/{model['id']}"), api.get(model["url"]), api.get("/v1/models/mdl_nope"),
        api.get("/v1/models", headers={"Authorization": ""}), api.post("/v1/jobs", json={}),
        api.get("/v1/nope"), api.post("/v1/keys", json={"team": "t"}), api.delete("/v1/keys/key_nope"),
        api.get("/v1/recipes/schema"), api.get("/dashboard/static/dashboard.js"), api.get("/docs"),
    ]
    for r in answers:
        _secure(r)
    for r in answers:
        if r.headers.get("content-type", "").startswith("application/json"):
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    # the dashboard keeps its own policy (it runs its scripts from 'self')
    page = api.get("/dashboard")
    _secure(page)
    assert page.headers["content-security-policy"] == "default-src 'self'; img-src 'self' blob:"


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_cors_off_by_default(api):
    origin = {"Origin": "https://evil.example"}
    r = api.get("/v1/models", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = api.options("/v1/models", headers={**origin, "Access-Control-Request-Method": "GET",
                                              "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code in (401, 405)


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_cors_for_listed_origins_only(configured, monkeypatch):
    from fastapi.testclient import TestClient

    from app.core.config import get_settings
    from app.main import create_app
    from tests.conftest import ADMIN_KEY

    monkeypatch.setenv("SQUEEZE_CORS_ORIGINS", "https://ml.example.com, https://ci.example.com")
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        ok = client.get("/v1/models", headers={**auth, "Origin": "https://ml.example.com"})
        assert ok.headers["access-control-allow-origin"] == "https://ml.example.com"
        _secure(ok)
        pre = client.options("/v1/jobs", headers={"Origin": "https://ci.example.com",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ci.example.com"
        other = client.get("/v1/models", headers={**auth, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_json_bodies_are_capped(api, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_body_bytes", 2000)
    model = upload_model(api, tiny_onnx()).json()
    big = {"model_id": model["id"], "recipe": "prune-50", "metadata": {"x": "y" * 3000}}
    r = api.post("/v1/jobs", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert r.json()["error"]["details"]["limit_bytes"] == 2000
    _secure(r)
    # chunked (no Content-Length): cut off while reading, same answer
    r = api.post("/v1/jobs", content=iter([b'{"model_id": "' + b"m" * 1500, b"m" * 1500 + b'"}']),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    # a lying Content-Length over the cap is refused before the body is read
    r = api.post("/v1/recipes/validate", content=b"{}", headers={"Content-Type": "application/json",
                                                                 "Content-Length": "999999999"})
    assert r.status_code == 413
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was stored
    # just under the cap is fine, and uploads have their own (larger) limit
    ok = api.post("/v1/jobs", json={**big, "metadata": {"x": "y" * 1500}})
    assert ok.status_code == 202, ok.text
    monkeypatch.setattr(get_settings(), "max_body_bytes", 100)
    assert len(tiny_onnx()) > 100
    assert upload_model(api, tiny_onnx(), name="again.onnx").status_code == 201


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_no_secret_in_logs_or_error_messages(api, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    key = new_team_key(api, "secretive")
    keys = {"Authorization": f"Bearer {key}"}
    hook_secret = "whsec-my-very-own-secret-1234"
    answers = [
        api.get("/v1/models/mdl_nope", headers=keys),  # 404
        api.post("/v1/jobs", json={"model_id": key}, headers=keys),  # 422
        api.post("/v1/jobs", json={"model_id": "mdl_x", "recipe": "prune-50"}, headers=keys),  # 404
        api.post("/v1/keys", json={"team": key + "!"}, headers=keys),  # 403 (not admin)
        api.post("/v1/keys", json={"team": "t/" + key}),  # 422: pattern
        api.get("/v1/models", headers={"Authorization": f"Bearer {key}x"}),  # 401, a near miss
        api.get("/v1/models", headers={"Authorization": f"Basic {key}"}),  # 401, wrong scheme
        api.post("/v1/webhooks", json={"url": "http://10.0.0.1/x", "secret": hook_secret}, headers=keys),  # 422
        api.post("/v1/jobs", content=b"{" + key.encode(), headers={**keys, "Content-Type": "application/json"}),
        api.post("/v1/models", content=b"\x80\x04not a model", headers=keys),  # 415
    ]
    created = api.get("/v1/keys").json()
    key_id = next(k["id"] for k in created if k["team"] == "secretive")
    assert api.delete(f"/v1/keys/{key_id}").status_code == 204
    answers.append(api.get("/v1/models", headers=keys))  # 401, revoked
    assert {r.status_code for r in answers} >= {401, 403, 404, 415, 422}
    for r in answers:
        assert key not in r.text and hook_secret not in r.text, (r.request.url, r.text)
        assert key not in str(r.headers)
    logged = caplog.text + "".join(str(rec.__dict__) for rec in caplog.records)
    out, err = capsys.readouterr()
    for text in (logged, out, err):
        assert key not in text and key[8:] not in text
        assert hook_secret not in text


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_an_unhandled_error_is_a_plain_500_with_the_headers(configured, caplog):
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app()

    def boom() -> None:
        raise RuntimeError("secret internals sqz_do_not_show")

    app.add_api_route("/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/boom")
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal", "message": "internal server error",
                                                           "details": {}}}
    _secure(r)
    assert "unhandled error" in caplog.text  # still logged, with its traceback, for the operator


def _restart(configured, **settings):
    """A new app on the same database, as after a restart: settings re-read, this process's key cache empty."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from testing.stack import reset_caches

    reset_caches()
    from app.core.config import get_settings

    for name, value in settings.items():
        setattr(get_settings(), name, value)
    return TestClient(create_app())


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"], indirect=True)
def test_a_revoked_bootstrap_admin_key_stays_revoked_across_restarts(api, configured):
    from tests.conftest import ADMIN_KEY

    other = api.post("/v1/keys", json={"team": "ops", "name": "second admin", "admin": True}).json()
    boot = next(k for k in api.get("/v1/keys").json() if k["name"] == "bootstrap-admin")
    assert api.delete(f"/v1/keys/{boot['id']}").status_code == 204
    assert api.get("/v1/models").status_code == 401
    for _ in range(2):  # a restart with the same SQUEEZE_BOOTSTRAP_ADMIN_KEY does not bring it back
        with _restart(configured) as again:
            assert again.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 401
            keys = again.get("/v1/keys", headers={"Authorization": f"Bearer {other['key']}"}).json()
            assert [k["revoked_at"] is not None for k in keys if k["name"] == "bootstrap-admin"] == [True]
    # a new bootstrap key is created at start-up when it does not exist yet
    with _restart(configured, bootstrap_admin_key="sqz_fresh_bootstrap_key_0123456789") as again:
        assert again.get("/v1/keys", headers={"Authorization": "Bearer sqz_fresh_bootstrap_key_0123456789"}
                         ).status_code == 200


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_metrics_need_an_admin_key_or_the_metrics_token(api, configured):
    from tests.conftest import ADMIN_KEY

    team_key = new_team_key(api, "curious")
    token = "prometheus-scrape-token-0123456789"
    answers = {"none": api.get("/metrics", headers={"Authorization": ""}),
               "garbage": api.get("/metrics", headers={"Authorization": "Bearer " + token}),  # no token configured
               "team": api.get("/metrics", headers={"Authorization": f"Bearer {team_key}"}),
               "admin": api.get("/metrics")}
    assert {who: r.status_code for who, r in answers.items()} == {"none": 401, "garbage": 401, "team": 403,
                                                                 "admin": 200}
    assert answers["team"].json()["error"]["code"] == "forbidden" and "squeeze_jobs" not in answers["team"].text
    assert 'squeeze_jobs{status="queued"}' in answers["admin"].text
    with _restart(configured, metrics_token=token, bootstrap_admin_key=ADMIN_KEY) as again:
        scrape = again.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scrape.status_code == 200 and "squeeze_jobs" in scrape.text
        assert again.get("/metrics", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
        assert again.get("/metrics").status_code == 401
        assert again.get("/metrics", headers={"Authorization": f"Bearer {team_key}"}).status_code == 403
        assert again.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
        # the token opens /metrics only, not the API
        assert again.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_metrics_token_is_long_or_empty():
    from pydantic import ValidationError

    from app.core.config import Settings

    assert Settings(metrics_token="").metrics_token == ""
    with pytest.raises(ValidationError):
        Settings(metrics_token="short")

