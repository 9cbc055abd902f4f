"""The accuracy guard through HTTP against a real server and worker: a job that misses its guard ends
`failed` with `guard_failed`, keeps (and labels) its artifacts, and its metrics say which bound failed."""

from __future__ import annotations

import pytest

from app.report_schema import validate_report
from testing import modelzoo
from tests.conftest import new_team_key
from testing.stack import wait_for
from tests.test_e2e import FAST_REAPER, upload


def test_a_guard_that_cannot_be_met_fails_the_job_and_keeps_its_artifacts(stack_factory, tmp_path):
    _, _, x_test, y_test = modelzoo.digits_split()
    mlp = modelzoo.train_mlp(epochs=5)
    stack = stack_factory("postgres", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=2)
    client = stack.client(new_team_key(stack.admin, "guarded"))
    model = upload(client, "models", modelzoo.export_pt2(mlp, x_test, tmp_path / "mlp.pt2"))
    eval_ds = upload(client, "datasets", modelzoo.write_npz(tmp_path / "eval.npz", x_test, y_test))
    recipe = {"steps": [{"type": "prune", "sparsity": 0.5}], "outputs": ["pt2", "safetensors"],
              "evaluate": {"repeats": 3, "batch_sizes": [1, 32]}}

    # No eval dataset, yet a bound on accuracy: refused at submit, naming the field.
    r = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {**recipe, "guard": {"max_accuracy_drop": 0.01}}})
    assert r.status_code == 422
    assert r.json()["error"]["details"]["errors"][0]["field"] == "recipe.guard.max_accuracy_drop"

    unmeetable = {"min_size_ratio": 1000.0, "max_accuracy_drop": 0.5}  # safetensors at 50%: ~2x, not 1000x
    meetable = {"min_size_ratio": 1.5, "min_agreement": 0.8}
    jobs = {name: client.post("/v1/jobs", json={"model_id": model["id"], "datasets": {"eval": eval_ds["id"]},
                                                "recipe": {**recipe, "guard": guard}}).json()["id"]
            for name, guard in (("unmeetable", unmeetable), ("meetable", meetable))}
    failed = wait_for(client, jobs["unmeetable"], timeout=300)
    assert failed["status"] == "failed" and failed["error"]["code"] == "guard_failed"
    assert "min_size_ratio 1000.0: measured" in failed["error"]["message"]
    verdict = failed["metrics"]["guard"]
    checks = {c["bound"]: c for c in verdict["checks"]}
    assert not verdict["passed"] and checks["max_accuracy_drop"]["passed"] and not checks["min_size_ratio"]["passed"]
    size_ratio = max(failed["metrics"]["ratios"]["size"], failed["metrics"]["ratios"]["safetensors_size"])
    assert checks["min_size_ratio"]["measured"] == size_ratio
    assert checks["min_size_ratio"]["missed_by"] == pytest.approx(1000.0 - size_ratio, abs=1e-4)
    names = {a["name"] for a in failed["artifacts"]}
    assert {"model.pt2", "model.safetensors", "report.json", "report.png"} <= names  # artifacts kept
    assert {a["label"] for a in failed["artifacts"]} == {"guard_failed"}  # and labelled
    report = client.get(f"/v1/jobs/{failed['id']}/artifacts/report.json").json()
    validate_report(report)
    assert report["guard"] == verdict
    png = client.get(f"/v1/jobs/{failed['id']}/artifacts/report.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"

    passed = wait_for(client, jobs["meetable"], timeout=300)
    assert passed["status"] == "succeeded" and passed["metrics"]["guard"]["passed"], passed["error"]
    assert {a["label"] for a in passed["artifacts"]} == {None}
