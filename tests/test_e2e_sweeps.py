"""A sweep through HTTP against a real server and worker: six prune points over the ResNet-style net (residual
blocks, batch norm), a guard, the pick and the chart."""

from __future__ import annotations

import io
import json
import time

from testing import modelzoo
from tests.conftest import new_team_key
from tests.test_e2e import upload

MAX_DROP = 0.02


def _smallest(metrics: dict) -> int:
    compressed = metrics["compressed"]
    return min(s for s in (compressed.get("size_bytes"), compressed.get("safetensors_size_bytes")) if s)


def test_sweep_picks_the_smallest_point_within_the_guard(stack_factory, tmp_path):
    from PIL import Image

    _, _, x_test, y_test = modelzoo.digits_split()
    resnet = modelzoo.train_resnet()
    # Default heartbeat timeout: six ResNet jobs on two cores must not be mistaken for lost workers.
    stack = stack_factory("sqlite", SQUEEZE_SANDBOX_THREADS="1")
    stack.start_api()
    stack.start_worker(concurrency=2)
    client = stack.client(new_team_key(stack.admin, "sweepers"))
    model = upload(client, "models", modelzoo.write_package(resnet, tmp_path / "resnet.zip", modelzoo.RESNET_SOURCE))
    eval_ds = upload(client, "datasets", modelzoo.write_npz(tmp_path / "eval.npz", modelzoo.as_resnet_input(x_test),
                                                            y_test))
    r = client.post("/v1/sweeps", json={
        "model_id": model["id"], "datasets": {"eval": eval_ds["id"]}, "objective": "smallest",
        "recipe": {"steps": [{"type": "prune", "sparsity": 0.5}], "outputs": ["pt2", "safetensors"],
                   "evaluate": {"repeats": 3, "batch_sizes": [1, 32]}, "guard": {"max_accuracy_drop": MAX_DROP}},
        "grid": {"steps[0].sparsity": [0.3, 0.5, 0.7], "steps[0].scope": ["global", "layer"]}})
    assert r.status_code == 202, r.text
    sweep_id = r.json()["id"]

    deadline = time.monotonic() + 240
    while not (sweep := client.get(f"/v1/sweeps/{sweep_id}").json())["done"]:
        assert time.monotonic() < deadline, sweep["counts"]
        time.sleep(0.5)
    jobs = {p["job_id"]: client.get(f"/v1/jobs/{p['job_id']}").json() for p in sweep["points"]}
    assert len(jobs) == 6
    for job in jobs.values():  # each point either succeeded or was measured and missed its guard
        assert job["status"] == "succeeded" or job["error"]["code"] == "guard_failed", job["error"]
        assert job["metrics"]["compressed"]["accuracy"] is not None

    # Independently: a point passes when it succeeded and its accuracy dropped by at most MAX_DROP; the pick is
    # the smallest passing result (ties: the more accurate).
    def drop(job):
        return job["metrics"]["original"]["accuracy"] - job["metrics"]["compressed"]["accuracy"]

    passing = [j for j in jobs.values() if j["status"] == "succeeded" and drop(j) <= MAX_DROP + 1e-9]
    assert passing, [drop(j) for j in jobs.values()]
    smallest = min(_smallest(j["metrics"]) for j in passing)
    best_accuracy = max(j["metrics"]["compressed"]["accuracy"] for j in passing
                        if _smallest(j["metrics"]) == smallest)
    pick = jobs[sweep["pick"]["job_id"]]
    assert pick in passing
    assert _smallest(pick["metrics"]) == smallest and pick["metrics"]["compressed"]["accuracy"] == best_accuracy
    for job in jobs.values():
        if job["status"] != "succeeded":
            assert all(a["label"] == "guard_failed" for a in job["artifacts"])
    by_job = {p["job_id"]: p for p in sweep["points"]}
    assert all(by_job[j["id"]]["guard"]["passed"] == (j in passing) for j in jobs.values())

    png = client.get(f"/v1/sweeps/{sweep_id}/pareto.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = json.loads(Image.open(io.BytesIO(png.content)).text["squeeze:points"])
    for panel in ("size", "latency"):
        assert {d["id"] for d in drawn if d["panel"] == panel} == set(jobs)
    assert {d["id"] for d in drawn if d["pick"]} == {pick["id"]}

    compare = client.get(f"/v1/models/{model['id']}/jobs/compare").json()
    assert {row["job_id"] for row in compare["data"]} == set(jobs)
    assert compare["pareto"]["quality"] == "accuracy_after" and compare["pareto"]["size"]
