"""Sweeps, comparison across jobs, Pareto charts, rerun and artifact labels on the real database, without a worker.

Where a measured result is needed, the test writes metrics into the job rows (the shape the sandbox reports) and
checks the API's pick and fronts against its own computation here.
"""

from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest

from tests.app.api.routes.test_api import npz_bytes, tiny_onnx, upload_model
from tests.conftest import new_team_key

BASE = {"steps": [{"type": "prune", "sparsity": 0.5}], "outputs": ["onnx", "safetensors"],
        "evaluate": {"repeats": 3, "batch_sizes": [1, 32]}, "guard": {"max_accuracy_drop": 0.02}}
GRID = {"steps[0].sparsity": [0.3, 0.5, 0.7], "steps[0].scope": ["global", "layer"]}
ORIGINAL = {"size": 100_000, "accuracy": 0.95, "latency": {"1": 1.0, "32": 4.0}}
MAX_DROP = 0.02


def fake_metrics(size: int, accuracy: float | None, latency32: float, agreement: float = 0.97,
                 guard: bool = False) -> dict:
    """Metrics in the sandbox's shape; `guard` adds the worker's verdict for max_accuracy_drop."""
    lat = {"1": latency32 / 4, "32": latency32}
    m = {
        "original": {"size_bytes": ORIGINAL["size"], "accuracy": ORIGINAL["accuracy"] if accuracy is not None else None,
                     "latency_ms": {"onnxruntime": {b: {"median": v} for b, v in ORIGINAL["latency"].items()}}},
        "compressed": {"size_bytes": size, "accuracy": accuracy, "agreement": agreement,
                       "latency_ms": {"onnxruntime": {b: {"median": v} for b, v in lat.items()}}},
        "ratios": {"size": round(ORIGINAL["size"] / size, 4),
                   "latency": {"onnxruntime": {b: round(ORIGINAL["latency"][b] / v, 4) for b, v in lat.items()}},
                   "accuracy_drop": round(ORIGINAL["accuracy"] - accuracy, 4) if accuracy is not None else None},
        "flags": [],
    }
    if guard:
        drop = m["ratios"]["accuracy_drop"]
        m["guard"] = {"passed": drop <= MAX_DROP, "checks": [{"bound": "max_accuracy_drop", "limit": MAX_DROP,
                                                             "measured": drop, "passed": drop <= MAX_DROP}]}
    return m


def set_job(job_id: str, status: str, metrics: dict | None = None, error_code: str | None = None) -> None:
    from app.core.db import session_scope, utcnow
    from app.core.tables import Job

    with session_scope() as db:
        job = db.get(Job, job_id)
        job.status, job.metrics, job.error_code = status, metrics, error_code
        job.error_message = "the result misses its guard" if error_code == "guard_failed" else error_code
        if status in ("succeeded", "failed", "canceled"):
            job.finished_at = utcnow()


@pytest.fixture
def setup(api):
    model = upload_model(api, tiny_onnx()).json()
    x = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    ds = api.post("/v1/datasets", params={"name": "eval.npz"},
                  content=npz_bytes(x=x, labels=np.arange(8) % 3)).json()
    return model, {"eval": ds["id"]}


def sweep_body(model, datasets, **over) -> dict:
    return {"model_id": model["id"], "datasets": datasets, "recipe": BASE, "grid": GRID, "objective": "smallest",
            **over}


def test_sweep_submits_one_job_per_point(api, setup):
    model, datasets = setup
    r = api.post("/v1/sweeps", json=sweep_body(model, datasets, metadata={"ticket": "ML-7"}))
    assert r.status_code == 202, r.text
    sweep = r.json()
    assert sweep["points_total"] == 6 and sweep["counts"] == {"queued": 6} and not sweep["done"]
    assert sweep["pick"] is None and "6 of 6 points not finished" in sweep["pick_reason"]
    expected = list(itertools.product(GRID["steps[0].sparsity"], GRID["steps[0].scope"]))
    assert [(p["values"]["steps[0].sparsity"], p["values"]["steps[0].scope"]) for p in sweep["points"]] == expected
    for i, (point, (sparsity, scope)) in enumerate(zip(sweep["points"], expected)):
        job = api.get(f"/v1/jobs/{point['job_id']}").json()
        assert point["index"] == i and point["status"] == "queued"
        assert job["recipe"]["steps"][0]["sparsity"] == sparsity and job["recipe"]["steps"][0]["scope"] == scope
        assert job["recipe"]["guard"]["max_accuracy_drop"] == MAX_DROP and job["outputs"] == ["onnx", "safetensors"]
        assert job["datasets"] == datasets and job["queue"] == "cpu"
        assert job["metadata"] == {"ticket": "ML-7", "sweep": {"point": i, "values": point["values"]}}
    listed = api.get("/v1/sweeps").json()
    assert [s["id"] for s in listed["data"]] == [sweep["id"]] and listed["data"][0]["points_total"] == 6
    assert api.get("/v1/sweeps", params={"model_id": "mdl_other"}).json()["data"] == []

    # A preset base and whole-section paths work too.
    r = api.post("/v1/sweeps", json=sweep_body(model, datasets, recipe="prune-50",
                                               grid={"outputs": [["onnx"], ["safetensors"]],
                                                     "evaluate.batch_sizes": [[1], [1, 8]]}))
    assert r.status_code == 202, r.text
    jobs = [api.get(f"/v1/jobs/{p['job_id']}").json() for p in r.json()["points"]]
    assert [(j["outputs"], j["recipe"]["evaluate"]["batch_sizes"]) for j in jobs] == [
        (["onnx"], [1]), (["onnx"], [1, 8]), (["safetensors"], [1]), (["safetensors"], [1, 8])]

    pages, after = [], None
    while True:
        page = api.get("/v1/sweeps", params={"limit": 1, **({"after": after} if after else {})}).json()
        pages += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            break
        after = page["next"]
    assert pages == [r.json()["id"], sweep["id"]]


def test_sweep_idempotency(api, setup):
    model, datasets = setup
    body = sweep_body(model, datasets)
    first = api.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "sw1"})
    again = api.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "sw1"})
    assert first.status_code == 202 and again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(api.get("/v1/jobs").json()["data"]) == 6
    conflict = api.post("/v1/sweeps", json={**body, "objective": "fastest"}, headers={"Idempotency-Key": "sw1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"


def _fields(r) -> list[str]:
    assert r.status_code == 422, r.text
    return [e["field"] for e in r.json()["error"]["details"]["errors"]]


def test_sweep_validation_names_the_point_and_field(api, setup):
    model, datasets = setup
    post = lambda **over: api.post("/v1/sweeps", json={**sweep_body(model, datasets), **over})  # noqa: E731
    assert _fields(post(grid={"steps[0].sparsity": [0.3, 0.5, 1.5]})) == ['grid["steps[0].sparsity"][2]']
    assert _fields(post(grid={"steps[0].nope": [1]})) == ['grid["steps[0].nope"]']
    assert _fields(post(grid={"steps[3].sparsity": [0.5]})) == ['grid["steps[3].sparsity"]']
    assert _fields(post(grid={"model.x": [1]})) == ['grid["model.x"]']
    assert _fields(post(grid={"guard.min_speed": [2]})) == ['grid["guard.min_speed"]']
    assert _fields(post(grid={"steps[0].sparsity": []})) == ['grid["steps[0].sparsity"]']
    assert _fields(post(grid={"steps[0].sparsity": [0.5, 0.5]})) == ['grid["steps[0].sparsity"]']
    assert _fields(post(grid={})) == ["grid"]
    # an output the format cannot write, varied by the grid: the grid entry is named
    assert _fields(post(grid={"outputs": [["onnx"], ["pt2"]]})) == ['grid["outputs"][1]']
    # channel pruning needs an eager model: the step (outside any grid path) is named in its point's recipe
    errors = post(grid={"steps[0].method": ["magnitude", "channel"]}).json()["error"]["details"]["errors"]
    assert errors[0]["field"].startswith("points[1].recipe.steps[0]") and errors[0]["point"] == 1
    # the guard needs a labelled eval dataset
    assert _fields(post(datasets={})) == ["points[0].recipe.guard.max_accuracy_drop"]
    assert _fields(post(objective={"size": 0, "speed": 0})) == ["objective"]
    assert post(objective="cheapest").status_code == 422
    assert post(recipe="nope").status_code == 422
    big = post(grid={"steps[0].sparsity": [i / 10 for i in range(1, 10)], "evaluate.repeats": list(range(1, 9))})
    assert big.status_code == 422 and big.json()["error"]["code"] == "too_many_points"
    assert post(model_id="mdl_nope").status_code == 404
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was submitted by a refused sweep


# (size, accuracy, latency at batch 32, how the job ends) per point, in grid order
OUTCOMES = [
    (60_000, 0.945, 3.0, "succeeded"),
    (40_000, 0.940, 2.5, "succeeded"),
    (20_000, 0.900, 2.0, "guard_failed"),     # the smallest of all, but it missed its guard
    (30_000, 0.935, 3.5, "succeeded"),
    (25_000, 0.920, 1.5, "succeeded_unchecked"),  # succeeded but misses the guard (no verdict recorded)
    (None, None, None, "failed"),
]


def _finish(points) -> dict[str, dict]:
    """Writes OUTCOMES into the point jobs; returns {job id: metrics} of those with a report."""
    reported = {}
    for point, (size, acc, lat, how) in zip(points, OUTCOMES):
        if how == "failed":
            set_job(point["job_id"], "failed", None, "engine_error")
            continue
        metrics = fake_metrics(size, acc, lat, guard=how != "succeeded_unchecked")
        if how == "guard_failed":
            set_job(point["job_id"], "failed", metrics, "guard_failed")
        else:
            set_job(point["job_id"], "succeeded", metrics)
        reported[point["job_id"]] = metrics
    return reported


def _front(items: dict[str, tuple[float, float]]) -> list[str]:
    """Brute force: ids no other item beats on both (lower cost, higher quality), by cost."""
    keep = [i for i, (c, q) in items.items()
            if not any(o != i and oc <= c and oq >= q and (oc < c or oq > q) for o, (oc, oq) in items.items())]
    return sorted(keep, key=lambda i: items[i])


def _score(objective, m) -> float:
    size, speed = m["ratios"]["size"], m["ratios"]["latency"]["onnxruntime"]["32"]
    if objective == "smallest":
        return size
    if objective == "fastest":
        return speed
    return (objective.get("size", 0) * math.log(size) + objective.get("speed", 0) * math.log(speed)
            - objective.get("accuracy", 0) * 100 * m["ratios"]["accuracy_drop"])


@pytest.mark.parametrize("objective", ["smallest", "fastest", {"size": 1, "speed": 1, "accuracy": 0.5}])
def test_pick_and_pareto_over_all_points(api, setup, objective):
    model, datasets = setup
    sweep = api.post("/v1/sweeps", json=sweep_body(model, datasets, objective=objective)).json()
    points = sweep["points"]
    set_job(points[0]["job_id"], "succeeded", fake_metrics(*OUTCOMES[0][:3], guard=True))
    partial = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert not partial["done"] and partial["pick"] is None and "5 of 6" in partial["pick_reason"]

    reported = _finish(points)
    got = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert got["done"] and got["counts"] == {"succeeded": 4, "failed": 2}
    # independent: qualifying = succeeded and within the guard, scored by the objective over all of them
    qualifying = {jid: m for jid, m in reported.items()
                  if api.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded"
                  and m["ratios"]["accuracy_drop"] <= MAX_DROP}
    best = max(qualifying, key=lambda jid: _score(objective, qualifying[jid]))
    assert got["pick"]["job_id"] == best, got["points"]
    assert got["pick"]["score"] == pytest.approx(_score(objective, qualifying[best]), rel=1e-4)
    by_job = {p["job_id"]: p for p in got["points"]}
    assert not by_job[points[2]["job_id"]]["qualifies"] and not by_job[points[4]["job_id"]]["qualifies"]
    assert by_job[points[4]["job_id"]]["guard"]["passed"] is False  # checked by the API when the worker did not
    assert by_job[points[2]["job_id"]]["error"]["code"] == "guard_failed"
    assert by_job[points[5]["job_id"]]["headline"] is None
    for jid, m in reported.items():
        assert by_job[jid]["headline"]["size_bytes"] == m["compressed"]["size_bytes"]
        assert by_job[jid]["headline"]["accuracy_after"] == m["compressed"]["accuracy"]
    assert got["pareto"]["quality"] == "accuracy_after"
    assert got["pareto"]["size"] == _front({j: (m["compressed"]["size_bytes"], m["compressed"]["accuracy"])
                                            for j, m in reported.items()})
    assert got["pareto"]["latency"] == _front({
        j: (m["compressed"]["latency_ms"]["onnxruntime"]["32"]["median"], m["compressed"]["accuracy"])
        for j, m in reported.items()})


def test_no_pick_says_why(api, setup):
    model, datasets = setup
    sweep = api.post("/v1/sweeps", json=sweep_body(model, datasets, grid={"steps[0].sparsity": [0.3, 0.5]})).json()
    a, b = (p["job_id"] for p in sweep["points"])
    set_job(a, "failed", fake_metrics(20_000, 0.8, 2.0, guard=True), "guard_failed")
    set_job(b, "canceled")
    got = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert got["done"] and got["pick"] is None
    assert "1 missed the guard" in got["pick_reason"] and "1 were canceled" in got["pick_reason"]


def _png_points(content: bytes) -> list[dict]:
    from PIL import Image

    from app.reports.plots import POINTS_KEY

    return json.loads(Image.open(io.BytesIO(content)).text[POINTS_KEY])


def _check_png(content: bytes) -> None:
    import matplotlib.image

    assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 10_000
    assert matplotlib.image.imread(io.BytesIO(content), format="png").shape[:2] == (500, 1200)


def test_pareto_png_draws_every_point(api, setup):
    model, datasets = setup
    sweep = api.post("/v1/sweeps", json=sweep_body(model, datasets)).json()
    reported = _finish(sweep["points"])
    got = api.get(f"/v1/sweeps/{sweep['id']}").json()
    r = api.get(f"/v1/sweeps/{sweep['id']}/pareto.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    _check_png(r.content)
    drawn = _png_points(r.content)
    assert r.headers["X-Plotted-Points"] == str(len(reported))
    for panel in ("size", "latency"):
        mine = [d for d in drawn if d["panel"] == panel]
        assert {d["id"] for d in mine} == set(reported)
        assert [d["id"] for d in sorted((d for d in mine if d["front"]), key=lambda d: d["x"])] == \
            got["pareto"][panel]
        assert [d["id"] for d in mine if d["pick"]] == [got["pick"]["job_id"]]


def test_plots_draw_points_and_skip_unmeasured():
    from app.reports.plots import pareto_png

    points = [{"id": f"j{i}", "label": f"p{i}", "size_bytes": 1000 * (i + 1), "latency_ms": (None if i == 2 else
                                                                                              1.0 + i),
               "accuracy_after": 0.9 - i / 100, "agreement": None, "failed_guard": i == 1, "runtime": "torch",
               "batch_size": 32} for i in range(4)]
    png, drawn = pareto_png(points, {"quality": "accuracy_after", "size": ["j0"], "latency": ["j0"]}, title="t",
                            pick="j0")
    _check_png(png)
    assert sorted(d["id"] for d in drawn if d["panel"] == "size") == ["j0", "j1", "j2", "j3"]
    assert sorted(d["id"] for d in drawn if d["panel"] == "latency") == ["j0", "j1", "j3"]
    assert _png_points(png) == drawn
    empty, none = pareto_png([], {"quality": None, "size": [], "latency": []}, title="empty")
    assert empty[:8] == b"\x89PNG\r\n\x1a\n" and none == []


def test_compare_jobs_of_a_model(api, setup):
    model, datasets = setup
    sweep = api.post("/v1/sweeps", json=sweep_body(model, datasets)).json()
    reported = _finish(sweep["points"])
    plain = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).json()
    set_job(plain["id"], "succeeded", fake_metrics(50_000, 0.95, 1.0))
    reported[plain["id"]] = fake_metrics(50_000, 0.95, 1.0)
    queued = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).json()

    r = api.get(f"/v1/models/{model['id']}/jobs/compare")
    assert r.status_code == 200, r.text
    got = r.json()
    rows = {row["job_id"]: row for row in got["data"]}
    assert set(rows) == set(reported) and queued["id"] not in rows
    assert [row["job_id"] for row in got["data"]] == sorted(rows, reverse=True)  # newest first
    guard_failed = sweep["points"][2]["job_id"]
    assert rows[guard_failed]["status"] == "failed" and rows[guard_failed]["error_code"] == "guard_failed"
    assert rows[plain["id"]]["sweep_id"] is None and rows[guard_failed]["sweep_id"] == sweep["id"]
    for jid, m in reported.items():
        head = rows[jid]["headline"]
        assert head["size_bytes"] == m["compressed"]["size_bytes"] and head["batch_size"] == 32
        assert head["latency_ms"] == m["compressed"]["latency_ms"]["onnxruntime"]["32"]["median"]
    assert got["pareto"]["size"] == _front({j: (m["compressed"]["size_bytes"], m["compressed"]["accuracy"])
                                            for j, m in reported.items()})
    assert got["pareto"]["latency"] == _front({
        j: (m["compressed"]["latency_ms"]["onnxruntime"]["32"]["median"], m["compressed"]["accuracy"])
        for j, m in reported.items()})
    at1 = api.get(f"/v1/models/{model['id']}/jobs/compare", params={"runtime": "onnxruntime", "batch_size": 1}).json()
    assert all(row["headline"]["batch_size"] == 1 for row in at1["data"])
    assert at1["pareto"]["latency"] == _front({
        j: (m["compressed"]["latency_ms"]["onnxruntime"]["1"]["median"], m["compressed"]["accuracy"])
        for j, m in reported.items()})
    assert api.get(f"/v1/models/{model['id']}/jobs/compare", params={"limit": 2}).json()["truncated"] is True

    png = api.get(f"/v1/models/{model['id']}/jobs/compare.png")
    assert png.status_code == 200
    _check_png(png.content)
    assert {d["id"] for d in _png_points(png.content)} == set(reported)

    other = {"Authorization": f"Bearer {new_team_key(api, 'gamma')}"}
    for path in (f"/v1/models/{model['id']}/jobs/compare", f"/v1/models/{model['id']}/jobs/compare.png",
                 f"/v1/sweeps/{sweep['id']}", f"/v1/sweeps/{sweep['id']}/pareto.png"):
        r = api.get(path, headers=other)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert api.get("/v1/sweeps", headers=other).json()["data"] == []
    assert api.post("/v1/sweeps", json=sweep_body(model, {}), headers=other).status_code == 404


def test_compare_falls_back_to_agreement(api, setup):
    model, _ = setup
    ids = [api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).json()["id"] for _ in range(3)]
    metrics = {ids[0]: fake_metrics(50_000, None, 2.0, agreement=0.99),
               ids[1]: fake_metrics(30_000, None, 3.0, agreement=0.95),
               ids[2]: fake_metrics(40_000, None, 1.0, agreement=0.90)}
    for jid, m in metrics.items():
        set_job(jid, "succeeded", m)
    got = api.get(f"/v1/models/{model['id']}/jobs/compare").json()
    assert got["pareto"]["quality"] == "agreement"
    assert got["pareto"]["size"] == _front({j: (m["compressed"]["size_bytes"], m["compressed"]["agreement"])
                                            for j, m in metrics.items()})
    assert got["pareto"]["size"] == [ids[1], ids[0]]


def test_rerun_same_model_datasets_recipe(api, setup):
    model, datasets = setup
    recipe = {**BASE, "steps": [{"type": "prune", "sparsity": 0.4}]}
    job = api.post("/v1/jobs", json={"model_id": model["id"], "datasets": datasets, "recipe": recipe,
                                     "metadata": {"ticket": "ML-9"}}).json()
    for status in ("running", "failed", "succeeded"):
        set_job(job["id"], status)
        r = api.post(f"/v1/jobs/{job['id']}/rerun")
        assert r.status_code == 202, r.text
        new = r.json()
        assert new["id"] != job["id"] and new["status"] == "queued"
        for key in ("model_id", "datasets", "recipe", "outputs", "queue"):
            assert new[key] == job[key], key
        assert new["metadata"] == {"ticket": "ML-9", "rerun_of": job["id"]}
    sweep = api.post("/v1/sweeps", json=sweep_body(model, datasets, grid={"steps[0].sparsity": [0.3]})).json()
    point_job = sweep["points"][0]["job_id"]
    rerun = api.post(f"/v1/jobs/{point_job}/rerun").json()
    assert rerun["metadata"] == {"rerun_of": point_job}  # a rerun is not a point of the sweep
    assert api.get(f"/v1/sweeps/{sweep['id']}").json()["points_total"] == 1
    assert api.post("/v1/jobs/job_nope/rerun").status_code == 404
    other = {"Authorization": f"Bearer {new_team_key(api, 'delta')}"}
    assert api.post(f"/v1/jobs/{job['id']}/rerun", headers=other).status_code == 404


def test_artifacts_of_a_guard_failed_job_are_labelled(api, setup):
    from app.core.db import new_id, session_scope
    from app.core.tables import Artifact

    model, datasets = setup
    ids = [api.post("/v1/jobs", json={"model_id": model["id"], "datasets": datasets, "recipe": BASE}).json()["id"]
           for _ in range(2)]
    set_job(ids[0], "failed", fake_metrics(20_000, 0.8, 2.0, guard=True), "guard_failed")
    set_job(ids[1], "succeeded", fake_metrics(60_000, 0.945, 2.0, guard=True))
    with session_scope() as db:
        for jid in ids:
            db.add(Artifact(id=new_id("art"), job_id=jid, name="model.onnx", format="onnx", size_bytes=1,
                            sha256="0" * 64))
    failed, ok = (api.get(f"/v1/jobs/{jid}").json() for jid in ids)
    assert failed["error"]["code"] == "guard_failed" and failed["metrics"]["guard"]["passed"] is False
    assert [a["label"] for a in failed["artifacts"]] == ["guard_failed"]
    assert [a["label"] for a in ok["artifacts"]] == [None]
