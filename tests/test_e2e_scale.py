"""Scale-out (docs/operations.md#deploying): API and workers with separate data dirs, sharing only PostgreSQL, Redis
and an S3-compatible bucket (moto's server)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from testing.fleet import SMALL_JOB, fleet_stack, run_fleet
from testing import modelzoo
from tests.conftest import make_backend, new_team_key
from testing.s3 import s3_server  # noqa: F401  (fixture)
from testing.stack import wait_for


@pytest.fixture
def services(tmp_path):
    """Skips (or fails under SQUEEZE_TEST_REQUIRE_SERVICES=1) when PostgreSQL or Redis is missing."""
    backend = make_backend("postgres", tmp_path / "probe")
    for drop in backend.cleanup:
        drop()


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_api_and_worker_share_no_disk(services, s3_server, tmp_path):  # noqa: F811
    x_train, _, x_test, y_test = modelzoo.digits_split()
    pt2 = modelzoo.export_pt2(modelzoo.train_mlp(), x_test, tmp_path / "mlp.pt2")
    eval_npz = modelzoo.write_npz(tmp_path / "eval.npz", x_test, y_test)
    stack = fleet_stack(tmp_path / "run", s3_server, workers=1)
    try:
        client = stack.client(new_team_key(stack.admin, "vision"))
        model = client.post("/v1/models", params={"name": "mlp.pt2"}, content=pt2.read_bytes()).json()
        ds = client.post("/v1/datasets", params={"name": "eval.npz"}, content=eval_npz.read_bytes()).json()
        r = client.post("/v1/jobs", json={"model_id": model["id"], "datasets": {"eval": ds["id"]},
                                          "recipe": {**SMALL_JOB, "outputs": ["pt2", "onnx"]}})
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json()["id"], timeout=180)
        assert job["status"] == "succeeded", (job["error"], stack.log_dir)
        assert job["metrics"]["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        names = {a["name"]: a for a in job["artifacts"]}
        assert {"report.json"} <= names.keys() and {"pt2", "onnx"} <= {a["format"] for a in job["artifacts"]}
        for art in job["artifacts"]:
            got = client.get(art["url"])
            assert got.status_code == 200, (art["name"], got.text)
            assert hashlib.sha256(got.content).hexdigest() == art["sha256"] == got.headers["etag"].strip('"')
            part = client.get(art["url"], headers={"Range": "bytes=0-9"})
            assert part.status_code == 206 and part.content == got.content[:10]
        report = json.loads(client.get(names["report.json"]["url"]).content)
        assert report["metrics"]["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        # Every blob is in the bucket; neither data dir holds one.
        keys = {o["Key"] for o in s3_server.client().list_objects_v2(
            Bucket=stack.env["SQUEEZE_BLOB_URL"].split("/")[2])["Contents"]}
        for sha in [model["sha256"], ds["sha256"], *(a["sha256"] for a in job["artifacts"])]:
            assert f"blobs/{sha[:2]}/{sha}" in keys
        for data_dir in (stack.data_dir, tmp_path / "run" / "worker0-data"):
            assert not _files_under(data_dir / "blobs"), data_dir
    finally:
        stack.stop()


@pytest.mark.timeout(420)
def test_thirty_jobs_spread_over_three_workers(services, s3_server, tmp_path):  # noqa: F811
    result = run_fleet(tmp_path, workers=3, jobs=30, s3=s3_server, timeout=300)
    failed = [(r["id"], r["status"], r["error"]) for r in result["rows"] if r["status"] != "succeeded"]
    assert not failed, (failed, result["log_dir"])
    assert result["succeeded"] == 30
    assert sorted(result["per_worker"]) == ["w0", "w1", "w2"], result["per_worker"]
    assert all(n >= 3 for n in result["per_worker"].values()), result["per_worker"]
    assert sum(result["per_worker"].values()) == 30
    print(f"\nfleet: {result['jobs_per_minute']} jobs/min over {result['elapsed_s']} s, spread {result['spread']}")


def test_team_running_limit_defers_without_blocking_other_teams(services, stack_factory, tmp_path):
    x_train, _, x_test, y_test = modelzoo.digits_split()
    pt2 = modelzoo.export_pt2(modelzoo.train_mlp(), x_test, tmp_path / "mlp.pt2")
    eval_npz = modelzoo.write_npz(tmp_path / "eval.npz", x_test, y_test)
    stack = stack_factory("postgres", SQUEEZE_TEAM_MAX_RUNNING="1", SQUEEZE_TEAM_DEFER_S="0.5",
                          SQUEEZE_SANDBOX_THREADS="1")
    stack.start_api()
    stack.start_worker(concurrency=3)
    submitted = {}
    for team, count in (("alpha", 3), ("beta", 1)):
        client = stack.client(new_team_key(stack.admin, team))
        model = client.post("/v1/models", params={"name": "mlp.pt2"}, content=pt2.read_bytes()).json()
        ds = client.post("/v1/datasets", params={"name": "eval.npz"}, content=eval_npz.read_bytes()).json()
        for _ in range(count):
            r = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": SMALL_JOB,
                                              "datasets": {"eval": ds["id"]}})
            assert r.status_code == 202, r.text
            submitted.setdefault(team, []).append((client, r.json()["id"]))
    done = {team: [wait_for(client, job_id, timeout=240) for client, job_id in jobs]
            for team, jobs in submitted.items()}
    for team, jobs in done.items():
        assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs), (team, stack.log_dir)
    runs = sorted((j["started_at"], j["finished_at"]) for j in done["alpha"])
    assert all(runs[i][1] <= runs[i + 1][0] for i in range(len(runs) - 1)), runs  # one alpha job at a time
    # beta was not held behind alpha's queue: it started before alpha's last job did
    assert done["beta"][0]["started_at"] < runs[-1][0]


def test_higher_priority_jobs_leave_the_queue_first(services, stack_factory, tmp_path):
    """Jobs wait with no worker up; a single-slot worker then takes them by priority (FIFO within one level)."""
    _, _, x_test, _ = modelzoo.digits_split()
    pt2 = modelzoo.export_pt2(modelzoo.train_mlp(), x_test, tmp_path / "mlp.pt2")
    stack = stack_factory("postgres", SQUEEZE_SANDBOX_THREADS="1")
    stack.start_api()
    client = stack.client(new_team_key(stack.admin, "ranked"))
    model = client.post("/v1/models", params={"name": "mlp.pt2"}, content=pt2.read_bytes()).json()
    assert client.post("/v1/jobs", json={"model_id": model["id"], "recipe": SMALL_JOB,
                                         "priority": 9}).status_code == 422  # above the default maximum, 5
    assert stack.admin.patch("/v1/teams/ranked/limits", json={"max_priority": 9}).status_code == 200
    submitted = []
    for priority in (1, 1, 5, 9, 1, 5):
        r = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": SMALL_JOB, "priority": priority})
        assert r.status_code == 202 and r.json()["priority"] == priority, r.text
        submitted.append(r.json()["id"])
    assert client.post("/v1/jobs", json={"model_id": model["id"], "recipe": SMALL_JOB,
                                         "priority": 10}).status_code == 422
    stack.start_worker(concurrency=1)
    done = [wait_for(client, job_id, timeout=240) for job_id in submitted]
    assert all(j["status"] == "succeeded" for j in done), [(j["id"], j["error"]) for j in done]
    started = [j["id"] for j in sorted(done, key=lambda j: j["started_at"])]
    by_priority = [j["id"] for j in sorted(done, key=lambda j: -j["priority"])]  # stable: submit order kept
    assert started == by_priority, ([(j["priority"], j["started_at"]) for j in done], stack.log_dir)
    rerun = client.post(f"/v1/jobs/{submitted[3]}/rerun").json()
    assert rerun["priority"] == 9
