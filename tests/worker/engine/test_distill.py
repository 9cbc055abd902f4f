"""Distillation (and the training loop it shares with fine-tuning) on the digits models: recovery after channel
pruning, label-free, keep best, feature matching, determinism, bad teachers and datasets, device selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from app.recipes import DistillSpec, parse_recipe
from testing import modelzoo as mz
from tests.worker.engine.test_channel_finetune import PKG, apply, datasets, hold_out, packages, pruned  # noqa: F401
from tests.worker.engine.test_channel_finetune import resnet  # noqa: F401  (fixture used by packages)
from tests.worker.engine.test_sandbox import final, make_job, run_sandbox
from worker.engine.errors import EngineError
from worker.engine.passes import StepContext, pass_for
from worker.engine.shared.training import lr_factor


def distill(model, spec: DistillSpec, data, teachers, tmp_path, events=None):
    ctx = StepContext(index=1, datasets=data, teachers=teachers, workdir=tmp_path,
                      event=(lambda name, row: events.append((name, row))) if events is not None else
                      (lambda name, row: None))
    return pass_for(spec).apply(model, spec, ctx)


def test_distillation_recovers_the_pruned_cnn_with_an_epoch_curve(packages, tmp_path):
    x, y = hold_out("cnn")
    model, _ = pruned(packages, tmp_path, "cnn")
    after_prune = mz.accuracy(model.handle, x, y)
    events = []
    spec = DistillSpec(epochs=2, lr=3e-3, temperature=4, alpha=0.7, schedule="cosine", keep="best")
    report = distill(model, spec, datasets("cnn"), {"original": (packages["cnn"], "package")}, tmp_path, events)
    after = mz.accuracy(model.handle, x, y)
    # Measured: 0.97 before, ~0.6 right after pruning, 0.97+ after 2 epochs of distillation.
    assert after > max(0.95, after_prune + 0.2), (after_prune, after)
    assert [name for name, _ in events] == ["epoch", "epoch"]
    assert [row for _, row in events] == report["epochs"]
    rows = report["epochs"]
    assert all({"loss", "train_accuracy", "eval_accuracy", "eval_agreement", "lr"} <= set(r) for r in rows)
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[1]["lr"] == pytest.approx(3e-3 * lr_factor(spec, 1))
    best = max(rows, key=lambda r: r["eval_accuracy"])
    assert report["kept_epoch"] == best["epoch"]
    assert after == pytest.approx(best["eval_accuracy"], abs=1e-6)  # the kept weights are that epoch's
    assert report["teacher"] == "original" and report["teacher_format"] == "package"
    assert not report["label_free"] and report["train_agreement_with_teacher"] > 0.95


def test_label_free_distillation_needs_no_labels(packages, tmp_path):
    x, y = hold_out("cnn")
    model, _ = pruned(packages, tmp_path, "cnn")
    data = datasets("cnn", labels=False)
    spec = DistillSpec(epochs=2, lr=3e-3, alpha=1.0)
    report = distill(model, spec, data, {"original": (packages["cnn"], "package")}, tmp_path)
    assert report["label_free"] and "train_accuracy" not in report["epochs"][0]
    assert mz.accuracy(model.handle, x, y) > 0.93
    # alpha < 1 mixes in the label loss: no labels is a clear error, as is a missing dataset
    for bad, data_ in ((DistillSpec(alpha=0.5), data), (DistillSpec(alpha=1.0), {})):
        with pytest.raises(EngineError) as err:
            distill(model, bad, data_, {"original": (packages["cnn"], "package")}, tmp_path)
        assert err.value.code == "bad_dataset"
    hard = DistillSpec(epochs=1, lr=1e-3, alpha=0.5, hard_labels=True)  # labels from the teacher's argmax
    assert distill(model, hard, data, {"original": (packages["cnn"], "package")}, tmp_path)["label_free"]


def test_teacher_that_scores_other_classes_or_other_inputs_is_refused(zoo, digits, tmp_path):
    _, _, x_test, _ = digits
    torch.manual_seed(0)
    five = mz.export_pt2(nn.Sequential(nn.Linear(64, 5)).eval(), x_test, tmp_path / "five.pt2")
    data = {"train": datasets("cnn")["train"]}
    from worker.engine.datasets import Dataset

    mlp_data = {"train": Dataset("train", {"x": x_test.astype(np.float32)}, None)}
    model = PKG.load(zoo["package"], tmp_path)  # the MLP package: (N, 64) -> 10 classes
    with pytest.raises(EngineError, match="same classes") as err:
        distill(model, DistillSpec(alpha=1.0), mlp_data, {"original": (five, "pt2")}, tmp_path)
    assert err.value.code == "bad_teacher"
    cnn = PKG.load(zoo["cnn_package"], tmp_path)  # the CNN's images do not fit the MLP teacher's input
    with pytest.raises(EngineError) as err:
        distill(cnn, DistillSpec(alpha=1.0, teacher="t"), data, {"t": (zoo["pt2"], "pt2")}, tmp_path)
    assert err.value.code == "bad_teacher"
    with pytest.raises(EngineError) as err:
        distill(cnn, DistillSpec(alpha=1.0, teacher="missing"), data, {}, tmp_path)
    assert err.value.code == "bad_teacher"


def test_feature_matching_and_determinism(zoo, digits, tmp_path):
    x_train, y_train, _, _ = digits
    from worker.engine.datasets import Dataset

    data = {"train": Dataset("train", {"x": x_train.astype(np.float32)}, y_train)}
    teachers = {"original": (zoo["package"], "package")}
    spec = DistillSpec(epochs=1, lr=1e-3, optimizer="sgd", features=["1", "3"], feature_weight=0.5, seed=7,
                       grad_clip=1.0)
    states, reports = [], []
    for _ in range(2):
        model = PKG.load(zoo["package"], tmp_path)
        apply(model, parse_recipe("prune-50").steps[0], {})
        reports.append(distill(model, spec, data, teachers, tmp_path))
        states.append(model.handle.state_dict())
    assert reports[0]["epochs"][0]["loss"] == reports[1]["epochs"][0]["loss"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert reports[0]["zeros_kept"] == reports[0]["zeros_before"] > 0  # pruned weights stayed zero
    model = PKG.load(zoo["package"], tmp_path)
    with pytest.raises(EngineError, match="not modules of the student") as err:
        distill(model, DistillSpec(features=["nope"]), data, teachers, tmp_path)
    assert err.value.code == "bad_teacher"


def test_cuda_on_a_worker_without_it_fails_at_once(zoo, digits, tmp_path):
    from worker.engine.job.context import resolve_device

    assert resolve_device("cpu", "auto") == "cpu"
    assert resolve_device("auto", "cpu") == "cpu"
    assert resolve_device("auto", "auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    _, _, x_test, y_test = digits
    ds = {"train": mz.write_npz(tmp_path / "t.npz", x_test, y_test)}
    job = make_job(tmp_path, zoo["package"], "package",
                   {"steps": [{"type": "distill", "alpha": 1.0}], "device": "cuda"}, ["package"], ds)
    spec = json.loads((job / "job.json").read_text())
    (job / "job.json").write_text(json.dumps({**spec, "device": "cpu"}))  # the worker's setting
    rc, lines, _ = run_sandbox(job)
    assert rc == 2
    error = final(lines)
    assert error["code"] == "device_unavailable" and "SQUEEZE_DEVICE=cpu" in error["message"]
    assert not any(line.get("stage") == "evaluate_original" for line in lines)  # failed before any work


def test_sandbox_distills_with_the_original_as_teacher_and_reports_the_curve(packages, tmp_path):
    x_train, y_train, x_test, y_test = mz.digits_split()
    data = {"train": mz.write_npz(tmp_path / "t.npz", mz.as_images(x_train)),  # no labels: label-free
            "eval": mz.write_npz(tmp_path / "e.npz", mz.as_images(x_test), y_test)}
    recipe = {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5},
                        {"type": "distill", "alpha": 1.0, "epochs": 2, "lr": 3e-3, "dataset": "train"}]}
    job = make_job(tmp_path, packages["cnn"], "package", recipe, ["onnx"], data)
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    epochs = [line["data"] for line in lines if line.get("type") == "event" and line.get("name") == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["stage"] == "steps[1].distill" for e in epochs)
    report = json.loads((job / "out" / "report.json").read_text())
    assert report["steps"][1]["epochs"] == [{k: v for k, v in e.items() if k not in ("step", "stage")}
                                            for e in epochs]
    assert report["device"] == "cpu"
    assert result["metrics"]["compressed"]["accuracy"] > 0.93


def test_pt2_trains_through_its_module_with_batch_norm_and_saves_the_trained_weights(resnet, tmp_path):
    """A .pt2 trains: BN statistics update in train mode (torchao's switch), pruned zeros stay, and the saved
    program holds the trained weights (its module shares storage with the state dict)."""
    from worker.engine.formats import get_format

    x, y = hold_out("resnet")
    path = mz.export_pt2(resnet, x, tmp_path / "resnet.pt2")
    fmt = get_format("pt2")
    model = fmt.load(path, tmp_path)
    apply(model, parse_recipe("prune-50").steps[0], {})
    buffers = {k: v.clone() for k, v in model.handle.state_dict.items() if "running_mean" in k}
    assert buffers
    report = distill(model, DistillSpec(epochs=1, lr=1e-3, alpha=0.7), datasets("resnet"),
                     {"original": (path, "pt2")}, tmp_path)
    assert report["weights_changed"] > 0 and report["zeros_kept"] == report["zeros_before"] > 0
    assert any(not torch.equal(buffers[k], model.handle.state_dict[k]) for k in buffers)
    in_memory = fmt.runner(model, "torch", 2)([x])
    fmt.save(model, tmp_path / "trained.pt2")
    again = fmt.load(tmp_path / "trained.pt2", tmp_path)
    np.testing.assert_allclose(fmt.runner(again, "torch", 2)([x]), in_memory, atol=1e-5)
    assert float((in_memory.argmax(1) == y).mean()) > 0.9


def test_slim_50_distill_preset_prunes_distills_and_quantizes(packages, tmp_path):
    import onnx

    from app.recipes import PRESETS

    x_train, y_train, x_test, y_test = mz.digits_split()
    data = {"train": mz.write_npz(tmp_path / "t.npz", mz.as_images(x_train), y_train),
            "calibration": mz.write_npz(tmp_path / "c.npz", mz.as_images(x_train[:256]), y_train[:256]),
            "eval": mz.write_npz(tmp_path / "e.npz", mz.as_images(x_test), y_test)}
    recipe = {**PRESETS["slim-50-distill"]["recipe"], "evaluate": {"runtimes": ["onnxruntime"],
                                                                   "batch_sizes": [1, 32], "repeats": 5}}
    job = make_job(tmp_path, packages["cnn"], "package", recipe, ["onnx"], data)
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    m = final(lines)["metrics"]
    assert [s["type"] for s in json.loads((job / "out" / "report.json").read_text())["steps"]] == \
        ["prune", "distill", "quantize"]
    ops = {n.op_type for n in onnx.load(str(job / "out" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or "QLinearConv" in ops
    assert m["ratios"]["macs"] > 3 and m["ratios"]["size"] > 3
    assert m["compressed"]["accuracy"] > 0.93 and m["ratios"]["accuracy_drop"] < 0.05
