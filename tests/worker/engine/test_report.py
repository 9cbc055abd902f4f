"""The one report schema: every report the sandbox writes (and every one the benchmarks committed) validates;
the guard's verdict, the run record and report.png say what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.recipes import GuardSpec
from app.report_schema import validate_report
from app.reports import check_guard, guard_message, headline, objective_score, pareto_front
from testing import modelzoo as mz
from tests.worker.engine.test_sandbox import final, make_job, run_sandbox

BENCH_REPORTS = Path(__file__).resolve().parents[3] / "bench" / "results" / "reports"


@pytest.fixture(scope="module")
def guarded_job(tmp_path_factory, zoo):
    """An MLP pruned 50% with a guard that passes on agreement and fails on speed-up (unstructured: no gain)."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = {"steps": [{"type": "prune", "sparsity": 0.5}],
              "guard": {"min_agreement": 0.5, "min_speedup": 3.0, "max_accuracy_drop": 0.5}}
    job = make_job(tmp, zoo["pt2"], "pt2", recipe, ["pt2", "safetensors"], {"eval": zoo["eval"]})
    spec = json.loads((job / "job.json").read_text())
    spec["model"]["sha256"] = "ab" * 32
    (job / "job.json").write_text(json.dumps(spec))
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    return job, final(lines)


def test_the_sandbox_report_follows_the_schema(guarded_job):
    job, result = guarded_job
    data = json.loads((job / "out" / "report.json").read_text())
    report = validate_report(data)
    assert report.model.sha256 == "ab" * 32 and report.metrics.run.model_sha256 == "ab" * 32
    assert report.recipe_hash == report.metrics.run.recipe_hash
    env = report.environment
    assert env.cpu and env.threads == 2 and env.libraries["torch"].startswith("2.13")
    assert [s.type for s in report.steps] == ["prune"] and report.steps[0].seconds > 0
    assert set(report.timings) >= {"load", "evaluate_original", "steps", "write", "evaluate_result"}
    # the job object's metrics are the report's metrics (the run record included)
    assert result["metrics"]["run"]["recipe_hash"] == data["recipe_hash"]


def test_schema_refuses_what_does_not_fit(guarded_job):
    job, _ = guarded_job
    data = json.loads((job / "out" / "report.json").read_text())
    for path, value in ((("metrics", "compressed", "size_bytes"), -1), (("recipe_hash",), "nothex"),
                        (("metrics", "flags"), ["fast"]), (("schema_version",), 2)):
        broken = json.loads(json.dumps(data))
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ValidationError):
            validate_report(broken)
    missing = {k: v for k, v in data.items() if k != "environment"}
    with pytest.raises(ValidationError):
        validate_report(missing)


def test_guard_verdict_says_which_bound_failed_by_how_much(guarded_job):
    job, result = guarded_job
    verdict = json.loads((job / "out" / "report.json").read_text())["guard"]
    by_bound = {c["bound"]: c for c in verdict["checks"]}
    assert not verdict["passed"]
    assert by_bound["min_agreement"]["passed"] and by_bound["max_accuracy_drop"]["passed"]
    speed = by_bound["min_speedup"]
    assert not speed["passed"] and speed["runtime"] == "torch" and speed["batch_size"] == 8
    measured = result["metrics"]["ratios"]["latency"]["torch"]["8"]
    assert speed["measured"] == measured and speed["missed_by"] == pytest.approx(3.0 - measured, abs=1e-6)
    assert "min_speedup 3.0: measured" in guard_message(verdict)
    # the supervisor's check from the same metrics agrees
    assert check_guard(GuardSpec(min_agreement=0.5, min_speedup=3.0, max_accuracy_drop=0.5),
                       result["metrics"]) == verdict


def test_report_png_shows_original_result_and_layers(guarded_job):
    from worker.engine.report_plot import render

    job, result = guarded_job
    png = (job / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "report.png" in [a["name"] for a in result["artifacts"]]
    _, points = render(result["metrics"], result["metrics"]["layers"], "t")
    m = result["metrics"]
    assert points["size"]["original"][0] == m["original"]["size_bytes"]
    smallest = min(m["compressed"]["size_bytes"], m["compressed"]["safetensors_size_bytes"])
    assert points["size"]["result"] == (smallest, m["compressed"]["accuracy"])
    # latency read where the headline speed-up is (the guard's min_speedup point): torch, the largest batch
    assert points["latency"]["result"][0] == m["compressed"]["latency_ms"]["torch"]["8"]["median"]
    assert points["latency"]["original"][0] == m["original"]["latency_ms"]["torch"]["8"]["median"]
    assert [name for name, _, _ in points["layers"]] == [layer["name"] for layer in m["layers"]]


def test_unmeasured_bounds_fail_and_pure_helpers():
    metrics = {"original": {"size_bytes": 100, "accuracy": None}, "compressed": {"size_bytes": 25, "agreement": 0.99},
               "ratios": {"size": 4.0, "latency": {"onnxruntime": {"1": 1.5, "32": 3.0}}, "accuracy_drop": None}}
    verdict = check_guard(GuardSpec(max_accuracy_drop=0.01, min_size_ratio=3.5), metrics)
    assert not verdict["passed"]
    assert [(c["bound"], c["passed"]) for c in verdict["checks"]] == [("max_accuracy_drop", False),
                                                                      ("min_size_ratio", True)]
    assert "not measured" in guard_message(verdict)
    head = headline(metrics)
    assert (head["speedup"], head["runtime"], head["batch_size"]) == (3.0, "onnxruntime", 32)
    assert headline(metrics, batch=1)["speedup"] == 1.5
    rows = [{"id": "a", "size_bytes": 10, "accuracy_after": 0.90}, {"id": "b", "size_bytes": 20, "accuracy_after": 0.95},
            {"id": "c", "size_bytes": 30, "accuracy_after": 0.94}, {"id": "d", "size_bytes": 10, "accuracy_after": 0.89}]
    assert [r["id"] for r in pareto_front(rows, "size_bytes", "accuracy_after")] == ["a", "b"]
    assert objective_score("smallest", head) == 4.0 and objective_score("fastest", head) == 3.0
    assert objective_score({"size": 1.0, "accuracy": 1.0}, head) is None  # accuracy not measured


@pytest.mark.skipif(not BENCH_REPORTS.is_dir(), reason="no committed benchmark reports")
def test_every_committed_benchmark_report_follows_the_schema():
    """Each validates, and the schema model dumps it unchanged: the same keys and numbers as written (reports of
    every step type and format, as the sandbox now writes them from the model)."""
    reports = sorted(BENCH_REPORTS.glob("*.json"))
    assert reports
    for path in reports:
        data = json.loads(path.read_text())
        dumped = validate_report(data).model_dump(mode="json")
        assert json.dumps(dumped, sort_keys=True) == json.dumps(data, sort_keys=True), path.name


def test_the_schema_model_dumps_the_report_as_written(guarded_job):
    """report.json is written from the schema model: dumping it again changes no key and no number (8 stays 8)."""
    job, _ = guarded_job
    data = json.loads((job / "out" / "report.json").read_text())
    dumped = validate_report(data).model_dump(mode="json")
    assert json.dumps(dumped, sort_keys=True) == json.dumps(data, sort_keys=True)
    assert any(isinstance(layer["bits"], int) for layer in data["layers"])


def _report_stage_inputs(data: dict, tmp_path: Path):
    """The report stage's inputs rebuilt from a written report, for a job directory at tmp_path."""
    import time

    from app.recipes import Recipe
    from worker.engine.formats import get_format
    from worker.engine.job.context import JobContext
    from worker.engine.job.measure_original import Original
    from worker.engine.job.measure_result import Result

    class Recorder:
        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append(message)

        def progress(self, stage, fraction, message=""):
            self.sent.append({"stage": stage, "progress": fraction})

    (tmp_path / "out").mkdir(parents=True)
    job = JobContext(jobdir=tmp_path, channel=Recorder(), spec={"job_id": "j", "model": data["model"]},
                     recipe=Recipe.model_validate(data["recipe"]), outputs=["pt2"], threads=2, timing_threads=2,
                     device="cpu", fmt=get_format("pt2"), started=time.perf_counter())
    layers = data["layers"]
    original = Original(data=None, inputs=[], labels=None, examples=[], stats=data["metrics"]["original"],
                        reference=None, original_onnx=None, paired=[], wanted=[], runnable_outputs=["pt2"],
                        layers_before={x["name"]: {"shape": x["shape"], "sparsity": x["sparsity_before"]}
                                       for x in layers})
    result = Result(stats=data["metrics"]["compressed"], compact=None,
                    layers_after={x["name"]: {"sparsity": x["sparsity_after"]} for x in layers})
    return job, original, result, data["steps"]


def test_the_report_stage_writes_a_valid_report_and_refuses_one_that_does_not_fit(guarded_job, tmp_path):
    from worker.engine.job.report import write_report

    job_dir, _ = guarded_job
    data = json.loads((job_dir / "out" / "report.json").read_text())
    job, original, result, steps = _report_stage_inputs(data, tmp_path / "good")
    message = write_report(job, None, original, steps, result, [])
    written = validate_report(json.loads((tmp_path / "good" / "out" / "report.json").read_text()))
    assert message["type"] == "result" and written.metrics.compressed.size_bytes == result.stats["size_bytes"]
    assert [a["name"] for a in message["artifacts"]][-1] == "report.json"

    job, original, result, steps = _report_stage_inputs(data, tmp_path / "bad")
    result.stats["size_bytes"] = -1
    with pytest.raises(ValidationError, match="size_bytes"):
        write_report(job, None, original, steps, result, [])
    assert not (tmp_path / "bad" / "out" / "report.json").exists()
