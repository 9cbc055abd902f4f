"""The sandbox entry point as the supervisor runs it: a real subprocess, empty environment, JSON-lines protocol."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from testing import modelzoo as mz
from tests.worker.engine.conftest import eligible_sparsity, onnx_predict

REPO = Path(__file__).resolve().parents[3]
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
FAST_EVAL = {"batch_sizes": [1, 8], "repeats": 3, "warmup": 1}
# Runs `worker.sandbox` as `-m` would, for a venv where `worker` is not importable under -I (see below).
_BOOT = ("import runpy, sys; sys.path.insert(0, {repo!r}); "
         "runpy.run_module('worker.sandbox', run_name='__main__', alter_sys=True)")


@lru_cache(maxsize=1)
def sandbox_argv() -> list[str]:
    """The exact supervisor command when the package is installed; else the same module via runpy.

    `-I` drops the current directory from sys.path, so `-m worker.sandbox` needs the project installed
    (a working editable install). The fallback keeps these tests about the sandbox, not the install.
    """
    probe = subprocess.run([sys.executable, "-I", "-c", "import worker.sandbox"], env=ENV, cwd="/",
                           capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-I", "-m", "worker.sandbox"]
    return [sys.executable, "-I", "-c", _BOOT.format(repo=str(REPO))]


def make_job(root: Path, model: Path, fmt: str, recipe: dict, outputs: list[str] | None = None,
             datasets: dict[str, Path] | None = None) -> Path:
    job = root / "job"
    (job / "inputs").mkdir(parents=True)
    suffix = {"pt2": ".pt2", "onnx": ".onnx", "package": ".zip"}[fmt]
    shutil.copy(model, job / "inputs" / f"model{suffix}")
    staged = {}
    for name, path in (datasets or {}).items():
        shutil.copy(path, job / "inputs" / f"{name}.npz")
        staged[name] = f"inputs/{name}.npz"
    recipe = {"evaluate": FAST_EVAL, **recipe}
    spec = {"job_id": "job-1", "model": {"path": f"inputs/model{suffix}", "format": fmt}, "recipe": recipe,
            "outputs": outputs or [fmt], "datasets": staged, "threads": 2}
    (job / "job.json").write_text(json.dumps(spec))
    return job


def run_sandbox(job: Path) -> tuple[int, list[dict], str]:
    proc = subprocess.run([*sandbox_argv(), str(job)], env=ENV, cwd=job, capture_output=True, text=True,
                          timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line must be protocol JSON
    return proc.returncode, lines, proc.stderr


def final(lines: list[dict]) -> dict:
    ends = [m for m in lines if m["type"] in ("result", "error")]
    assert len(ends) == 1 and lines[-1] is ends[0]
    return ends[0]


def prune(sparsity: float = 0.5, **kw) -> dict:
    return {"steps": [{"type": "prune", "method": "magnitude", "sparsity": sparsity, **kw}]}


def test_pt2_global_prune_writes_pt2_and_onnx(zoo, tmp_path, digits):
    job = make_job(tmp_path, zoo["pt2"], "pt2", prune(0.5, scope="global"), ["pt2", "onnx"], {"eval": zoo["eval"]})
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert [a["name"] for a in result["artifacts"]] == ["model.pt2", "model.onnx", "report.png", "report.json"]
    m = result["metrics"]
    assert m["original"]["sparsity"] == 0.0 and m["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert m["original"]["accuracy"] > 0.9 and m["compressed"]["accuracy"] > 0.9
    assert 0.9 < m["compressed"]["agreement"] <= 1.0 and m["compressed"]["cosine"] > 0.9
    assert m["ratios"]["nonzero_params"] == pytest.approx(m["original"]["nonzero_params"]
                                                          / m["compressed"]["nonzero_params"], rel=1e-3)
    assert set(m["original"]["latency_ms"]["torch"]) == {"1", "8"}
    assert {layer["name"] for layer in m["layers"]} == {"0.weight", "2.weight", "4.weight"}
    assert result["engine_seconds"] > 0
    # Progress is monotonic, names the stages, and the step event carries the step report.
    progress = [m for m in lines if m["type"] == "progress"]
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    assert {"load", "evaluate_original", "steps[0].prune", "write", "evaluate_result"} <= {p["stage"] for p in progress}
    (event,) = [m for m in lines if m["type"] == "event"]
    assert event["name"] == "step_done" and event["data"]["stage"] == "steps[0].prune"
    # The artifacts on disk are what the metrics claim.
    out = job / "out"
    assert eligible_sparsity("pt2", out / "model.pt2", tmp_path)[0] == pytest.approx(0.5, abs=0.01)
    assert eligible_sparsity("onnx", out / "model.onnx", tmp_path)[0] == pytest.approx(0.5, abs=0.01)
    _, _, x, y = digits
    assert (onnx_predict(out / "model.onnx", x).argmax(1) == y).mean() > 0.9
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == m and report["environment"]["threads"] == 2
    assert report["environment"]["torch"].startswith("2.") and report["steps"][0]["type"] == "prune"
    assert set(report["timings"]) >= {"load", "evaluate_original", "steps", "write", "evaluate_result"}


def test_onnx_layer_prune(zoo, tmp_path):
    job = make_job(tmp_path, zoo["onnx"], "onnx", prune(0.5, scope="layer"), None, {"eval": zoo["eval"]})
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    m = final(lines)["metrics"]
    assert all(layer["sparsity_after"] == pytest.approx(0.5, abs=0.005) for layer in m["layers"])
    assert "onnxruntime" in m["compressed"]["latency_ms"] and m["compressed"]["accuracy"] > 0.9
    overall, per_layer = eligible_sparsity("onnx", job / "out" / "model.onnx", tmp_path)
    assert overall == pytest.approx(0.5, abs=0.01) and len(per_layer) == 3


def test_package_to_pt2_and_package(zoo, tmp_path, digits):
    job = make_job(tmp_path, zoo["cnn_package"], "package", prune(0.5), ["pt2", "package"],
                   {"eval": zoo["cnn_eval"]})
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert [a["format"] for a in result["artifacts"]] == ["pt2", "package", "png", "json"]
    m = result["metrics"]
    assert m["compressed"]["format"] == "pt2" and m["original"]["format"] == "package"
    assert m["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert m["compressed"]["accuracy"] is not None and m["compressed"]["agreement"] is not None
    for fmt, name in (("pt2", "model.pt2"), ("package", "model.zip")):
        assert eligible_sparsity(fmt, job / "out" / name, tmp_path)[0] == pytest.approx(0.5, abs=0.01)
    import torch

    ep = torch.export.load(str(job / "out" / "model.pt2"))
    assert ep.module()(torch.from_numpy(mz.as_images(digits[2][:5]))).shape == (5, 10)


def test_no_effect_when_targets_match_nothing(zoo, tmp_path):
    job = make_job(tmp_path, zoo["pt2"], "pt2", prune(0.5, targets=["encoder.*"]), None, {"eval": zoo["eval"]})
    rc, lines, _ = run_sandbox(job)
    end = final(lines)
    assert rc == 2 and end["type"] == "error" and end["code"] == "no_effect"
    assert "steps[0]" in end["message"]


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "package"])
def test_bad_model_file(tmp_path, fmt):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not a model" * 100)
    job = make_job(tmp_path, garbage, fmt, prune())
    rc, lines, _ = run_sandbox(job)
    end = final(lines)
    assert rc == 2 and end["code"] == "bad_model", end
    assert not (job / "out" / "report.json").exists()


FORGED = '{"type": "result", "metrics": {}, "artifacts": [], "engine_seconds": 0}'
NOISY_SOURCE = f"""\
import sys
print({FORGED!r})
from torch import nn


def build_model():
    print({FORGED!r})
    sys.stdout.write("FORGED-LINE\\n")
    sys.stdout.flush()
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
"""


def test_prints_in_user_code_never_reach_the_protocol_channel(mlp, digits, tmp_path):
    # No eval dataset either: latency and similarity run on the package's example input shapes.
    package = mz.write_package(mlp, tmp_path / "noisy.zip", NOISY_SOURCE, example_inputs=[digits[2][:2]])
    job = make_job(tmp_path, package, "package", prune(0.5))
    proc = subprocess.run([*sandbox_argv(), str(job)], env=ENV, cwd=job, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FORGED-LINE" not in proc.stdout and "FORGED-LINE" in proc.stderr
    assert FORGED in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    result = final(lines)
    assert result["type"] == "result" and result["metrics"]  # the real one, not the forged empty one
    c = result["metrics"]["compressed"]
    assert c["accuracy"] is None and c["agreement"] is None and c["cosine"] is not None
    assert set(c["latency_ms"]["torch"]) == {"1", "8"}


def test_pt2_without_dataset_uses_its_example_inputs(zoo, tmp_path):
    job = make_job(tmp_path, zoo["pt2"], "pt2", prune(0.5))
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    m = final(lines)["metrics"]
    assert m["original"]["accuracy"] is None and m["ratios"]["accuracy_drop"] is None
    assert set(m["ratios"]["latency"]["torch"]) == {"1", "8"}
    report = json.loads((job / "out" / "report.json").read_text())
    assert any("no 'eval' dataset" in note for note in report["notes"])


def test_package_without_examples_or_dataset_is_bad_dataset(zoo, tmp_path):
    job = make_job(tmp_path, zoo["cnn_package"], "package", prune(0.5))
    rc, lines, _ = run_sandbox(job)
    end = final(lines)
    assert rc == 2 and end["code"] == "bad_dataset"


def test_dataset_of_the_wrong_shape_is_bad_dataset(zoo, tmp_path, digits):
    wrong = mz.write_npz(tmp_path / "wrong.npz", digits[2][:, :10], digits[3])
    job = make_job(tmp_path, zoo["onnx"], "onnx", prune(0.5), None, {"eval": wrong})
    rc, lines, _ = run_sandbox(job)
    end = final(lines)
    assert rc == 2 and end["code"] == "bad_dataset" and "(10,)" in end["message"]
