"""OpenVINO as a runtime Squeeze times (issue 19), and the report's deploy recommendation: the fastest runtime and
format per batch size. Real sandbox processes and a real OpenVINO; the missing-OpenVINO case runs the sandbox with
an `openvino` package that fails to import, first on its path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from app.recipes import RecipeError, check_against_format, parse_recipe
from app.report_schema import validate_report
from tests.worker.engine.test_quantize import make_job, run_ok
from tests.worker.engine.test_sandbox import ENV, REPO, final
from worker.engine.job.report import recommendation

PRUNE = [{"type": "prune", "method": "magnitude", "sparsity": 0.3}]
BOTH = {"runtimes": ["onnxruntime", "openvino"]}


@pytest.fixture(scope="module")
def onnx_job(tmp_path_factory, zoo):
    """The digits MLP as ONNX, pruned, timed on onnxruntime and openvino at batch 1 and 32."""
    job = make_job(tmp_path_factory.mktemp("ov"), zoo["onnx"], "onnx", PRUNE, ["onnx"], {"eval": zoo["eval"]}, BOTH)
    return job, *run_ok(job)


def test_an_onnx_model_is_timed_on_both_runtimes_and_the_fastest_is_named(onnx_job):
    _, _, report = onnx_job
    m = report["metrics"]
    for side in ("original", "compressed"):
        assert {rt: set(b) for rt, b in m[side]["latency_ms"].items()} == \
            {"onnxruntime": {"1", "32"}, "openvino": {"1", "32"}}, side
    assert set(m["ratios"]["latency"]) == {"onnxruntime", "openvino"}
    rec = m["recommendation"]
    assert set(rec) == {"1", "32"}
    for batch, best in rec.items():
        medians = {(model, rt): m[side]["latency_ms"][rt][batch]["median"]
                   for model, side in (("result", "compressed"), ("original", "original")) for rt in BOTH["runtimes"]}
        assert best["format"] == "onnx" and best["latency_ms"] == min(medians.values())
        assert medians[(best["model"], best["runtime"])] == best["latency_ms"]
        other = best["runner_up"]  # the fastest on the other runtime
        assert other["runtime"] != best["runtime"] and other["latency_ms"] >= best["latency_ms"]
        assert other["latency_ms"] == min(v for (_, rt), v in medians.items() if rt == other["runtime"])
    assert m["compressed"]["agreement"] >= 0.98  # a 30% prune of a trained MLP, its outputs from onnxruntime
    assert validate_report(report)


def test_openvino_outputs_agree_with_onnxruntime(onnx_job, digits):
    """The result written by the job, reloaded and run on both: the same numbers, at every batch shape (a dynamic
    batch is compiled per shape) and again after other shapes (a compiled model is reused, its output copied)."""
    from worker.engine.formats import get_format

    job, _, _ = onnx_job
    _, _, x_test, _ = digits
    fmt = get_format("onnx")
    model = fmt.load(job / "out" / "model.onnx", job / "work")
    ort, ov = fmt.runner(model, "onnxruntime", 1), fmt.runner(model, "openvino", 1)
    first = ov([x_test[:32]])
    for batch in (1, 7, 32, 360):
        assert np.abs(ov([x_test[:batch]]) - ort([x_test[:batch]])).max() < 1e-4, batch
    assert np.array_equal(first, ov([x_test[:32]])) and first.dtype == np.float32


def test_a_pt2_original_is_timed_on_openvino_as_its_onnx_export(zoo, tmp_path):
    """A .pt2 in, ONNX out, timed on torch and openvino: the original on openvino as its fp32 ONNX export, so
    openvino has a speed-up; the recommendation can name the .pt2 on torch or the ONNX on openvino."""
    _, report = run_ok(make_job(tmp_path, zoo["pt2"], "pt2", PRUNE, ["onnx"], {"eval": zoo["eval"]},
                                {"runtimes": ["torch", "openvino"]}))
    m = report["metrics"]
    assert set(m["original"]["latency_ms"]) == {"torch", "openvino"}
    assert set(m["compressed"]["latency_ms"]) == {"openvino"} and set(m["ratios"]["latency"]) == {"openvino"}
    assert "original on openvino: timed as its fp32 ONNX export" in report["notes"]
    pairs = {(r["runtime"], r["format"], r["model"]) for best in m["recommendation"].values()
             for r in (best, best["runner_up"])}
    assert pairs <= {("torch", "pt2", "original"), ("openvino", "onnx", "original"), ("openvino", "onnx", "result")}
    assert validate_report(report)


def test_openvino_missing_fails_the_job_at_once_with_runtime_unavailable(zoo, tmp_path):
    fake = tmp_path / "fake"
    (fake / "openvino").mkdir(parents=True)
    (fake / "openvino" / "__init__.py").write_text("raise ImportError('no OpenVINO on this worker (test)')\n")
    job = make_job(tmp_path, zoo["onnx"], "onnx", PRUNE, ["onnx"], {"eval": zoo["eval"]}, BOTH)
    boot = (f"import runpy, sys; sys.path[:0] = [{str(fake)!r}, {str(REPO)!r}]; "
            "runpy.run_module('worker.sandbox', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-I", "-c", boot, str(job)], env=ENV, cwd=job, capture_output=True,
                          text=True, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    error = final(lines)
    assert proc.returncode == 2 and error["code"] == "runtime_unavailable", (error, proc.stderr[-2000:])
    assert "no OpenVINO on this worker (test)" in error["message"]
    assert "pip install 'squeeze[worker]'" in error["message"] and "evaluate.runtimes" in error["message"]
    assert not any(m.get("stage") in ("load", "steps") for m in lines if m["type"] == "progress")  # before any work


def test_openvino_compiles_and_runs_inside_the_real_sandbox(tmp_path):
    """Under bubblewrap, a read-only root, its own uid and the test stack's rlimits (64 processes): OpenVINO finds
    its CPU plugin and the CPU's topology, and its thread pool fits."""
    from tests.worker.test_isolation import LIMITS, run_py
    from worker.jobdir import prepare_jobdir

    jobdir = tmp_path / "job"
    prepare_jobdir(jobdir, LIMITS)
    proc, out, err = run_py("""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
        weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "W")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        from worker.engine.formats._openvino import onnx_runner
        run = onnx_runner(model.SerializeToString(), 2)
        print(float(run([np.ones((3, 64), np.float32)]).sum()), float(run([np.ones((1, 64), np.float32)]).sum()))
        """, jobdir)
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["1920.0", "640.0"]


def test_openvino_runs_only_what_an_onnx_model_or_output_gives():
    recipe = parse_recipe({"steps": PRUNE, "outputs": ["pt2"], "evaluate": {"runtimes": ["torch", "openvino"]}})
    with pytest.raises(RecipeError) as err:
        check_against_format(recipe, "pt2")
    assert [e["field"] for e in err.value.errors] == ["evaluate.runtimes[1]"]
    assert check_against_format(parse_recipe({"steps": PRUNE, "evaluate": BOTH}), "onnx") == ["onnx", "safetensors"]


def _timed(**by_runtime: dict[str, float]) -> dict:
    return {rt.replace("_", "-"): {b: {"median": v, "p90": v} for b, v in by_batch.items()}
            for rt, by_batch in by_runtime.items()}


def test_the_recommendation_ranks_every_model_runtime_and_format():
    original = {"format": "pt2", "latency_ms": _timed(torch={"1": 0.5, "32": 9.0}, onnxruntime={"1": 0.3, "32": 8.0})}
    result = {"format": "pt2", "latency_ms": _timed(torch={"1": 0.4, "32": 7.0}, onnxruntime={"1": 0.3, "32": 3.0},
                                                    openvino={"1": 0.6, "32": 2.5})}
    rec = recommendation(original, result, ["pt2", "onnx", "safetensors"])
    assert list(rec) == ["1", "32"]
    # a tie goes to the result; the runner-up is on another runtime or format, not the original on the same one
    assert rec["1"] == {"runtime": "onnxruntime", "format": "onnx", "model": "result", "latency_ms": 0.3,
                        "runner_up": {"runtime": "torch", "format": "pt2", "model": "result", "latency_ms": 0.4}}
    assert (rec["32"]["runtime"], rec["32"]["latency_ms"], rec["32"]["runner_up"]["runtime"]) == \
        ("openvino", 2.5, "onnxruntime")
    slow = {"format": "onnx", "latency_ms": _timed(onnxruntime={"8": 2.0})}
    fast = {"format": "onnx", "latency_ms": _timed(onnxruntime={"8": 1.0})}
    assert recommendation(fast, slow, ["onnx"]) == {"8": {"runtime": "onnxruntime", "format": "onnx",
                                                          "model": "original", "latency_ms": 1.0, "runner_up": None}}
    assert recommendation({"format": "hf", "latency_ms": {}}, {"format": "gguf", "latency_ms": {}}, ["gguf"]) == {}


def test_the_schema_checks_the_recommendation_and_older_reports_still_validate(onnx_job):
    _, _, report = onnx_job
    older = json.loads(json.dumps(report))
    del older["metrics"]["recommendation"]
    assert validate_report(older).model_dump(mode="json") == older  # dumped as written: no key added
    assert validate_report(report).model_dump(mode="json") == report
    for path, value in ((("1", "model"), "mine"), (("1", "latency_ms"), -1.0), (("1", "runner_up", "speed"), 2),
                        ((), {"b1": {}}), (("32", "runtime"), "")):
        data = json.loads(json.dumps(report))
        node = data["metrics"]
        key = "recommendation"
        for part in path:
            node, key = node[key], part
        node[key] = value
        with pytest.raises(ValidationError, match="recommendation"):
            validate_report(data)
