"""Webhooks over HTTP (no worker): per-job webhooks at submit, team webhooks, deliveries, /metrics, request ids."""

from __future__ import annotations

import pytest

from tests.app.api.routes.test_api import tiny_onnx, upload_model
from tests.conftest import new_team_key

HOOK = "https://hooks.example.invalid/hook"  # .invalid never resolves: no test sends anywhere


def _as(api, key):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/h", "http://10.0.0.5/h", "http://169.254.169.254/latest",
                                 "http://[::1]/h", "ftp://example.com/h"])
def test_job_webhook_to_a_non_public_target_is_422_naming_the_field(api, url):
    model = upload_model(api, tiny_onnx()).json()
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                   "webhook": {"url": url, "secret": "s" * 20}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["errors"][0]["field"] == "webhook.url"


@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::ffff:10.0.0.1]", "[64:ff9b::a9fe:a9fe]",
                                  "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[64:ff9b:1::808:808]"])
def test_team_webhook_to_ipv4_wrapped_in_ipv6_is_422(api, host):
    """NAT64, 6to4, IPv4-mapped and Teredo addresses of private IPv4 targets are private targets."""
    r = api.post("/v1/webhooks", json={"url": f"http://{host}:8080/hook"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]["details"]["errors"][0]
    assert error["field"] == "url" and "not a public address" in error["message"]
    assert api.post("/v1/webhooks", json={"url": "http://[64:ff9b::808:808]/hook"}).status_code == 201


def test_job_webhook_needs_a_secret_and_never_shows_it(api):
    model = upload_model(api, tiny_onnx()).json()
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50", "webhook": {"url": HOOK}})
    assert r.status_code == 422 and r.json()["error"]["details"]["errors"][0]["field"] == "webhook.secret"
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                   "webhook": {"url": HOOK, "events": ["bogus"], "secret": "s" * 20}})
    assert r.status_code == 422 and r.json()["error"]["details"]["errors"][0]["field"].startswith("webhook.events")
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                   "webhook": {"url": HOOK, "secret": "my-very-own-secret"}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["webhook"] == {"url": HOOK, "events": ["started", "completed"]}
    assert "my-very-own-secret" not in api.get(f"/v1/jobs/{job['id']}").text
    # With the team's signing secret, a job webhook needs no secret of its own.
    created = api.post("/v1/webhooks/signing-secret")
    assert created.status_code == 201 and created.json()["secret"].startswith("whsec_")
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                   "webhook": {"url": HOOK, "events": ["completed"]}})
    assert r.status_code == 202, r.text


def test_team_webhooks_create_list_delete(api):
    key = new_team_key(api, "hookers")
    r = api.post("/v1/webhooks", json={"url": HOOK, "events": ["completed"], "description": "ci"},
                 headers=_as(api, key))
    assert r.status_code == 201, r.text
    hook = r.json()
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["completed"]
    listed = api.get("/v1/webhooks", headers=_as(api, key)).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    assert api.get("/v1/webhooks").json()["data"] == []  # another team's webhooks are not listed
    assert api.delete(f"/v1/webhooks/{hook['id']}").status_code == 404
    r = api.post("/v1/webhooks", json={"url": "http://192.168.1.1/x"}, headers=_as(api, key))
    assert r.status_code == 422 and r.json()["error"]["details"]["errors"][0]["field"] == "url"
    assert api.delete(f"/v1/webhooks/{hook['id']}", headers=_as(api, key)).status_code == 204
    assert api.get("/v1/webhooks", headers=_as(api, key)).json()["data"] == []


def test_canceling_a_queued_job_queues_its_completed_delivery(api):
    key = new_team_key(api, "cancelers")
    user = _as(api, key)
    api.post("/v1/webhooks", json={"url": HOOK, "events": ["started", "completed"]}, headers=user)
    model = upload_model(api, tiny_onnx(), headers=user).json()
    job = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}, headers=user).json()
    assert api.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=user).json()["data"] == []
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=user).json()["status"] == "canceled"
    deliveries = api.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=user).json()["data"]
    assert [(d["event"], d["attempt"], d["url"]) for d in deliveries] == [("completed", 1, HOOK)]
    assert deliveries[0]["status"] in ("pending", "failed")  # example.com may not resolve here
    assert api.get(f"/v1/jobs/{job['id']}/webhook-deliveries").status_code == 404  # another team's job


def test_metrics_scrape(api):
    api.get("/v1/models")
    text = api.get("/metrics").text
    assert 'squeeze_jobs{status="queued"}' in text
    assert 'squeeze_http_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert "squeeze_http_request_duration_seconds_bucket" in text
    assert 'squeeze_sandbox_failures_total{code="resource_limit"}' in text
    assert "squeeze_webhook_deliveries_pending" in text


def test_request_id_is_echoed_or_made(api):
    r = api.get("/healthz", headers={"X-Request-ID": "ci-run-42.step-3"})
    assert r.headers["x-request-id"] == "ci-run-42.step-3"
    made = api.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and made != api.get("/healthz").headers["x-request-id"]
    assert api.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != \
        "bad id\twith spaces"
