"""The report's flags and their one-line reasons (worker/engine/job/flags.py), and a newcomer's first jobs through
the sandbox: prune-50 with its default outputs shrinks the file, every output is sized and timed in its runtime."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from app.recipes import check_against_format, parse_recipe
from app.report_schema import validate_report
from app.reports import headline
from testing import modelzoo as mz
from tests.worker.engine.test_quantize import FAST_EVAL, make_job, run_ok
from worker.engine.job.flags import flag_reasons

PRUNE = [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]


def _measured(size: float, latency: dict, before=None, after=None, output: str = "pt2") -> dict:
    return {"ratios": {"size": size, "latency": latency}, "original": before or {}, "compressed": after or {},
            "size_ratio_output": output}


def test_flags_and_reasons():
    reasons = flag_reasons(_measured(1.0, {"torch": {"1": 1.01, "32": 1.04}}), PRUNE, ["pt2"])
    assert list(reasons) == ["no_size_reduction", "no_speedup"]
    assert "add safetensors to outputs" in reasons["no_size_reduction"]
    assert "best: 1.04x on torch at batch 32" in reasons["no_speedup"] and "dense CPU kernels" in reasons["no_speedup"]
    assert flag_reasons(_measured(3.9, {"torch": {"1": 1.0, "32": 2.5}}), PRUNE, ["pt2", "safetensors"]) == {}
    channel = [{"type": "prune", "method": "channel"}]
    assert "dense CPU" not in flag_reasons(_measured(2.0, {"torch": {"1": 1.0}}), channel, ["pt2"])["no_speedup"]
    untimed = flag_reasons(_measured(2.0, {}), [{"type": "quantize", "calibration_dataset": "eval"}], ["onnx"])
    assert list(untimed) == ["no_speedup", "calibrated_on_eval"] and "no runtime timed both" in untimed["no_speedup"]


def test_speedup_inside_the_noise_is_flagged():
    noisy_before = {"latency_ms": {"torch": {"1": {"median": 0.10, "p90": 0.14}}}}
    noisy_after = {"latency_ms": {"torch": {"1": {"median": 0.09, "p90": 0.12}}}}  # 1.11x, but p90 > median
    noisy = flag_reasons(_measured(1.0, {"torch": {"1": 1.11}}, noisy_before, noisy_after), [], [])
    assert noisy["no_speedup"] == "the best, 1.11x on torch at batch 1, is within run-to-run noise"
    clear_after = {"latency_ms": {"torch": {"1": {"median": 0.04, "p90": 0.05}}}}
    assert "no_speedup" not in flag_reasons(_measured(1.0, {"torch": {"1": 2.5}}, noisy_before, clear_after), [], [])


def test_prune_50_with_default_outputs_shrinks_a_resnet(tmp_path, digits):
    """The most visible preset on a ResNet: the compact safetensors is written by default and is the headline."""
    _, _, x_test, y_test = digits
    resnet = mz.train_resnet(epochs=1)
    images = mz.as_resnet_input(x_test[:256])
    model = mz.export_pt2(resnet, images, tmp_path / "resnet.pt2")
    data = {"eval": mz.write_npz(tmp_path / "eval.npz", images, y_test[:256])}
    assert check_against_format(parse_recipe("prune-50"), "pt2") == ["pt2", "safetensors"]
    _, report = run_ok(make_job(tmp_path, model, "pt2", PRUNE, None, data))
    validate_report(report)
    m = report["metrics"]
    assert report["outputs"] == ["pt2", "safetensors"]
    assert m["size_ratio_output"] == "safetensors" and m["ratios"]["size"] > 1.5
    sizes = m["compressed"]["output_sizes"]
    assert m["ratios"]["size"] == round(m["original"]["size_bytes"] / min(sizes.values()), 4)
    assert headline(m)["size_bytes"] == min(sizes.values()) and headline(m)["size_ratio"] == m["ratios"]["size"]
    assert "no_size_reduction" not in m["flags"] and set(m["flags"]) == set(m["flag_reasons"])


def test_every_output_is_sized_and_timed_in_its_runtime(zoo, tmp_path):
    """A .pt2 in, .pt2 and ONNX out: the ONNX output is timed on onnxruntime against the original's ONNX export."""
    job = make_job(tmp_path, zoo["pt2"], "pt2", PRUNE, ["pt2", "onnx"], {"eval": zoo["eval"]})
    _, report = run_ok(job)
    m = report["metrics"]
    assert set(m["compressed"]["output_sizes"]) == {"pt2", "onnx"}
    assert set(m["compressed"]["latency_ms"]) == set(m["original"]["latency_ms"]) == {"torch", "onnxruntime"}
    assert set(m["ratios"]["latency"]) == {"torch", "onnxruntime"}
    assert all(set(by_batch) == {str(b) for b in FAST_EVAL["batch_sizes"]}
               for by_batch in m["compressed"]["latency_ms"].values())
    assert json.loads((job / "job.json").read_text())["outputs"] == ["pt2", "onnx"]


def test_the_schema_checks_flag_reasons(tmp_path, zoo):
    _, report = run_ok(make_job(tmp_path, zoo["onnx"], "onnx", PRUNE, None, {"eval": zoo["eval"]}))
    assert report["outputs"] == ["onnx", "safetensors"] and validate_report(report)
    # whether this run's timings raised a flag is noise; the schema is checked on a flag set here
    report["metrics"]["flags"], report["metrics"]["flag_reasons"] = ["no_speedup"], {"no_speedup": "why"}
    assert validate_report(report)
    for broken in ({"no_speedup": "why", "brand_new": "x"}, {"no_speedup": ""}, "not a dict"):
        data = json.loads(json.dumps(report))
        data["metrics"]["flag_reasons"] = broken
        with pytest.raises(ValidationError):
            validate_report(data)


def test_static_int8_of_a_batch_1_pt2_calibrates_and_times_at_its_batch(tmp_path, digits, cnn):
    """A .pt2 exported with a batch-1 example: both int8 writers (PT2E, ONNX Runtime) calibrate batch by batch at
    batch 1, every output is timed at batch 1 only, and the notes say which batch sizes were skipped and why."""
    import torch

    _, _, x_test, y_test = digits
    images = mz.as_images(x_test)
    torch.export.save(torch.export.export(cnn.eval(), (torch.from_numpy(images[:1]),)), str(tmp_path / "b1.pt2"))
    data = {"eval": mz.write_npz(tmp_path / "eval.npz", images, y_test)}
    steps = [{"type": "quantize", "method": "static_int8"}]
    _, report = run_ok(make_job(tmp_path, tmp_path / "b1.pt2", "pt2", steps, ["pt2", "onnx"], data))
    m = report["metrics"]
    assert set(m["compressed"]["output_sizes"]) == {"pt2", "onnx"} and m["ratios"]["size"] > 3
    assert {rt: set(by_batch) for rt, by_batch in m["compressed"]["latency_ms"].items()} == \
        {"torch": {"1"}, "onnxruntime": {"1"}}
    skipped = [n for n in report["notes"] if "batch 32 skipped" in n]
    assert len(skipped) >= 2 and all('torch.export.Dim("batch")' in n for n in skipped)
    assert "calibrated_on_eval" in m["flags"] and m["compressed"]["agreement"] >= 0.95


def test_calibration_chunks_and_the_fixed_batch_hint():
    import numpy as np

    from worker.engine.shared.data import calibration_chunks, fixed_batch_hint

    x = np.arange(5, dtype=np.float32).reshape(5, 1)
    assert [c[0].ravel().tolist() for c in calibration_chunks([x], 2, fixed=True)] == [[0, 1], [2, 3], [4, 0]]
    assert [len(c[0]) for c in calibration_chunks([x], 2, fixed=False)] == [2, 2, 1]
    ort_error = "Got invalid dimensions for input: x for the following indices index: 0 Got: 32 Expected: 1"
    assert 'torch.export.Dim("batch")' in fixed_batch_hint(ort_error)
    assert fixed_batch_hint("out of memory") == "out of memory"
