"""Webhooks, metrics and logs through a real API server and a real worker (PostgreSQL + Redis, SQLite): a receiver
on 127.0.0.1 (allowlisted) gets signed `started`/`progress`/`completed` deliveries of a prune-50 job, a flaky
team webhook gets its third attempt, /metrics counts the job, and the logs are JSON lines with ids."""

from __future__ import annotations

import json
import re
import time

import pytest

from squeeze_client import verify_webhook  # the client package's helper, as a receiver would use it
from testing import modelzoo
from tests.conftest import new_team_key
from testing.stack import wait_for
from tests.test_e2e import FAST_REAPER, upload
from testing.webhook_receiver import Receiver

JOB_SECRET = "whsec_" + "c3F1ZWV6ZS13ZWJob29rLXRlc3Qtc2VjcmV0"
WEBHOOK_ENV = {"SQUEEZE_WEBHOOK_ALLOWLIST": "127.0.0.1", "SQUEEZE_WEBHOOK_RETRY_BASE_S": "0.5",
               "SQUEEZE_WEBHOOK_POLL_INTERVAL_S": "0.2", "SQUEEZE_WEBHOOK_PROGRESS_INTERVAL_S": "1"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits-hooks")
    _, _, x_test, y_test = modelzoo.digits_split()
    mlp = modelzoo.train_mlp()
    return {"pt2": modelzoo.export_pt2(mlp, x_test, d / "mlp.pt2"), "eval": modelzoo.write_npz(d / "eval.npz",
                                                                                               x_test, y_test)}


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def _events(receiver, path) -> set[str]:
    return {r.headers.get("squeeze-event") for r in receiver.at(path)}


def _json_lines(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.parametrize("backend_name", ["postgres", "sqlite"])
def test_webhooks_metrics_and_logs_end_to_end(backend_name, stack_factory, digits, receiver):
    stack = stack_factory(backend_name, **FAST_REAPER, **WEBHOOK_ENV)
    stack.start_api()
    stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "hooks"))
    receiver.statuses["/flaky"] = [500, 500, 200]
    r = client.post("/v1/webhooks", json={"url": receiver.url + "/flaky", "events": ["completed"]})
    assert r.status_code == 201, r.text
    team_hook = r.json()
    model = upload(client, "models", digits["pt2"])
    refused = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                            "webhook": {"url": "http://10.1.1.1/h", "secret": JOB_SECRET}})
    assert refused.status_code == 422 and refused.json()["error"]["details"]["errors"][0]["field"] == "webhook.url"
    eval_ds = upload(client, "datasets", digits["eval"])
    r = client.post("/v1/jobs", headers={"X-Request-ID": "e2e-submit-1"},
                    json={"model_id": model["id"], "recipe": "prune-50", "datasets": {"eval": eval_ds["id"]},
                          "webhook": {"url": receiver.url + "/job", "secret": JOB_SECRET,
                                      "events": ["started", "progress", "completed"]}})
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == "e2e-submit-1"
    job_id = r.json()["id"]
    job = wait_for(client, job_id)
    assert job["status"] == "succeeded", (job["error"], stack.log_dir)

    # The job's own webhook: started, progress, completed, each signed with the job's secret. Deliveries may
    # arrive in any order (API and worker each run a sender).
    deadline = time.monotonic() + 30
    while not {"started", "progress", "completed"} <= _events(receiver, "/job") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {"started", "progress", "completed"} <= _events(receiver, "/job"), receiver.at("/job")
    got = receiver.at("/job")
    for delivery in got:
        verify_webhook(JOB_SECRET, delivery.headers, delivery.body)
        assert delivery.headers["content-type"] == "application/json"
    by_event = {d.headers["squeeze-event"]: json.loads(d.body) for d in got}
    assert by_event["started"]["id"] == job_id and by_event["started"]["status"] == "running"
    assert by_event["progress"]["status"] == "running"
    completed = by_event["completed"]
    assert completed["status"] == "succeeded" and completed["artifacts"] and completed["metrics"]
    assert completed == client.get(f"/v1/jobs/{job_id}").json()  # the same JSON as GET /v1/jobs/{id}
    assert "secret" not in json.dumps(completed["webhook"])

    # The team webhook answers 500 twice: the third attempt delivers, with the same message id and body.
    flaky = receiver.wait("/flaky", 3, timeout=30)
    assert len({d.headers["webhook-id"] for d in flaky}) == 1 and len({d.body for d in flaky}) == 1
    for delivery in flaky:
        verify_webhook(team_hook["secret"], delivery.headers, delivery.body)
    assert [d.headers["squeeze-attempt"] for d in flaky] == ["1", "2", "3"]
    assert flaky[1].at - flaky[0].at >= 0.45  # backoff: base 0.5 s, then 1 s

    # The receiver has the body before the sender has recorded the answer: wait for no row to be pending.
    deadline = time.monotonic() + 15
    deliveries = client.get(f"/v1/jobs/{job_id}/webhook-deliveries").json()["data"]
    while any(d["status"] == "pending" for d in deliveries) and time.monotonic() < deadline:
        time.sleep(0.1)
        deliveries = client.get(f"/v1/jobs/{job_id}/webhook-deliveries").json()["data"]
    team_rows = [(d["attempt"], d["status"], d["status_code"]) for d in deliveries if d["webhook_id"]]
    assert team_rows == [(1, "failed", 500), (2, "failed", 500), (3, "delivered", 200)]
    own = [d for d in deliveries if d["webhook_id"] is None]
    assert {d["event"] for d in own} >= {"started", "progress", "completed"}
    assert all(d["status"] == "delivered" and d["status_code"] == 200 for d in own)
    other = stack.client(new_team_key(stack.admin, "strangers"))
    assert other.get(f"/v1/jobs/{job_id}/webhook-deliveries").status_code == 404

    # /metrics, read from the database on scrape: the job by status, its duration, and this API's requests.
    text = stack.admin.get("/metrics").text
    assert 'squeeze_jobs{status="succeeded"} 1.0' in text
    assert 'squeeze_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert re.search(r'squeeze_http_requests_total\{method="GET",route="/v1/jobs/\{job_id\}",status="200"\} \d', text)
    assert 'squeeze_job_duration_seconds_count{status="succeeded"} 1.0' in text
    assert 'squeeze_step_duration_seconds_count{step_type="prune"} 1.0' in text
    assert 'squeeze_queue_depth' in text and 'squeeze_sandbox_failures_total{code="timeout"} 0.0' in text

    # Logs: one JSON object per line; the request's line carries the id echoed in X-Request-ID, the worker's the
    # job id.
    api_lines = _json_lines(stack.log_dir / "api.log")
    submit = [line for line in api_lines if line.get("request_id") == "e2e-submit-1"]
    access = [line for line in submit if line["logger"] == "squeeze.http"]
    assert len(access) == 1 and access[0]["status"] == 202 and access[0]["route"] == "/v1/jobs"
    assert {"time", "level", "logger", "message"} <= submit[0].keys()
    worker_lines = _json_lines(stack.log_dir / "worker0.log")
    job_lines = [line for line in worker_lines if line.get("job_id") == job_id]
    assert any(line["message"] == "job succeeded" for line in job_lines), worker_lines[-20:]
