"""Channel pruning (torch-pruning), fine-tuning and MACs, on the digits CNN and a small ResNet with batch norm."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.recipes import ChannelPruneSpec, FinetuneSpec, PruneSpec
from testing import modelzoo as mz
from tests.worker.engine.conftest import eligible_sparsity
from tests.worker.engine.test_sandbox import final, make_job, run_sandbox
from worker.engine import metrics
from worker.engine.datasets import Dataset
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.passes import StepContext, pass_for

PKG = get_format("package")


@pytest.fixture(scope="module")
def resnet():
    torch.set_num_threads(2)
    return mz.train_resnet()


@pytest.fixture(scope="module")
def packages(tmp_path_factory, cnn, resnet) -> dict:
    root = tmp_path_factory.mktemp("channel")
    return {"cnn": mz.write_package(cnn, root / "cnn.zip", mz.CNN_SOURCE),
            "resnet": mz.write_package(resnet, root / "resnet.zip", mz.RESNET_SOURCE)}


def datasets(kind: str, labels: bool = True) -> dict[str, Dataset]:
    """calibration (512 training samples), train (all), eval (hold-out) for the CNN or the ResNet."""
    x_train, y_train, x_test, y_test = mz.digits_split()
    conv = mz.as_images if kind == "cnn" else mz.as_resnet_input
    return {"calibration": Dataset("calibration", {"x": conv(x_train[:512])}, y_train[:512] if labels else None),
            "train": Dataset("train", {"x": conv(x_train)}, y_train if labels else None),
            "eval": Dataset("eval", {"x": conv(x_test)}, y_test)}


def hold_out(kind: str) -> tuple[np.ndarray, np.ndarray]:
    _, _, x_test, y_test = mz.digits_split()
    return (mz.as_images if kind == "cnn" else mz.as_resnet_input)(x_test), y_test


def apply(model, spec, data: dict[str, Dataset], index: int = 0) -> dict:
    return pass_for(spec).apply(model, spec, StepContext(index=index, datasets=data))


def channel(sparsity: float = 0.5, **kw) -> ChannelPruneSpec:
    return ChannelPruneSpec(method="channel", sparsity=sparsity, **kw)


def pruned(packages, tmp_path, kind: str, **kw):
    model = PKG.load(packages[kind], tmp_path)
    report = apply(model, channel(**kw), datasets(kind))
    return model, report


def test_channel_l2_half_of_the_cnn_cuts_macs_and_params_about_4x(packages, tmp_path):
    x, y = hold_out("cnn")
    model = PKG.load(packages["cnn"], tmp_path)
    macs_before = metrics.macs(model, [x[:1]])
    report = apply(model, channel(0.5, importance="l2"), datasets("cnn"))
    # Measured: 337,536 -> 86,848 MACs (3.89x), 38,282 -> 9,802 params (3.91x).
    assert report["macs_before"] == macs_before == 337_536
    assert report["macs_after"] == metrics.macs(model, [x[:1]]) == 86_848
    assert report["macs_ratio"] >= 3.0 and report["params_ratio"] >= 3.0
    shapes = {layer["name"]: (layer["shape"], layer["shape_after"]) for layer in report["layers"]}
    assert shapes["0.weight"] == ([16, 1, 3, 3], [8, 1, 3, 3])
    assert shapes["2.weight"] == ([32, 16, 3, 3], [16, 8, 3, 3])
    assert shapes["8.weight"] == ([10, 64], [10, 32])  # the classifier keeps its 10 outputs
    assert model.extra["architecture_changed"]
    with torch.inference_mode():
        assert model.handle(torch.from_numpy(x)).shape == (len(x), 10)


def test_channel_resnet_keeps_residual_adds_consistent(packages, tmp_path):
    model, report = pruned(packages, tmp_path, "resnet", importance="l2")
    net = model.handle
    # Both sides of every residual add lose the same channels.
    assert net.layer1.conv2.out_channels == net.stem[0].out_channels == 12
    assert net.layer2.conv2.out_channels == net.layer2.shortcut[0].out_channels == 24
    assert net.layer3.conv2.out_channels == net.layer3.shortcut[0].out_channels == 48
    assert net.fc.out_features == 10
    assert report["macs_ratio"] > 3.5 and report["params_ratio"] > 3.5  # 6.84M -> 1.72M MACs, 174k -> 44k
    x, _ = hold_out("resnet")
    with torch.inference_mode():
        assert net(torch.from_numpy(x[:5])).shape == (5, 10)


def test_bn_recalibration_recovers_accuracy_right_after_pruning(packages, tmp_path):
    x, y = hold_out("resnet")
    accs = {}
    for recalibrate in (False, True):
        model, report = pruned(packages, tmp_path, "resnet", importance="l2", recalibrate_bn=recalibrate)
        assert report["bn_recalibrated"] == (9 if recalibrate else 0)
        accs[recalibrate] = mz.accuracy(model.handle, x, y)
    # Measured: 0.99 before, 0.20 right after pruning, 0.48 with re-estimated statistics.
    assert accs[True] > accs[False] + 0.1, accs


def test_taylor_importance_needs_labels(packages, tmp_path):
    x, y = hold_out("cnn")
    model, report = pruned(packages, tmp_path, "cnn", importance="taylor", dataset="calibration")
    assert report["importance"] == "taylor" and report["macs_ratio"] > 3
    assert mz.accuracy(model.handle, x, y) > 0.8  # measured 0.95 (l2: 0.59)
    model = PKG.load(packages["cnn"], tmp_path)
    unlabelled = datasets("cnn", labels=False)
    with pytest.raises(EngineError) as err:
        apply(model, channel(importance="taylor", dataset="calibration"), unlabelled)
    assert err.value.code == "bad_dataset"


def test_round_to_keeps_channel_counts_multiples(packages, tmp_path):
    model, report = pruned(packages, tmp_path, "resnet", sparsity=0.3, round_to=8)
    convs = [m for m in model.handle.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs), [c.out_channels for c in convs]
    assert any(layer["shape_after"] != layer["shape"] for layer in report["layers"])


def test_ignore_everything_is_no_effect(packages, tmp_path):
    model = PKG.load(packages["cnn"], tmp_path)
    with pytest.raises(EngineError) as err:
        apply(model, channel(ignore=["*"]), datasets("cnn"))
    assert err.value.code == "no_effect"
    with pytest.raises(EngineError) as err:
        apply(model, channel(targets=["8.weight"]), datasets("cnn"))  # only the classifier: always kept
    assert err.value.code == "no_effect"


def test_graph_formats_are_refused(zoo, tmp_path):
    """Channel pruning needs an eager module; training refuses ONNX only (a .pt2 trains: test_distill.py)."""
    for fmt_name, specs in (("pt2", [channel()]), ("onnx", [channel(), FinetuneSpec()])):
        model = get_format(fmt_name).load(zoo[fmt_name], tmp_path)
        for spec in specs:
            with pytest.raises(EngineError) as err:
                apply(model, spec, datasets("cnn"))
            assert err.value.code == "unsupported"


def test_exports_of_the_pruned_package_use_the_smaller_model(packages, tmp_path):
    x, _ = hold_out("cnn")
    model, _ = pruned(packages, tmp_path, "cnn")
    with torch.inference_mode():
        expected = model.handle(torch.from_numpy(x)).numpy()
    with pytest.raises(EngineError) as err:
        PKG.export(model, "package", tmp_path / "out.zip", [x[:2]])
    assert err.value.code == "unsupported"

    PKG.export(model, "pt2", tmp_path / "out.pt2", [x[:2]])
    pt2 = get_format("pt2").load(tmp_path / "out.pt2", tmp_path)
    np.testing.assert_allclose(get_format("pt2").runner(pt2, "torch", 2)([x]), expected, rtol=1e-4, atol=1e-4)
    assert metrics.macs(pt2, [x[:1]]) == 86_848
    assert {r.name: r.shape for r in get_format("pt2").eligible_weights(pt2)}["2.weight"] == (16, 8, 3, 3)

    PKG.export(model, "onnx", tmp_path / "out.onnx", [x[:2]])
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    onnx_model = get_format("onnx").load(tmp_path / "out.onnx", tmp_path)
    assert metrics.macs(onnx_model) == 86_848  # shape inference agrees with the torch count


def test_finetune_recovers_the_pruned_cnn(packages, tmp_path):
    x, y = hold_out("cnn")
    model, _ = pruned(packages, tmp_path, "cnn")
    after_prune = mz.accuracy(model.handle, x, y)
    progress, events = [], []
    spec = FinetuneSpec(epochs=2, lr=3e-3)
    report = pass_for(spec).apply(model, spec, StepContext(index=1, datasets=datasets("cnn"),
                                                           progress=lambda f, m: progress.append((f, m)),
                                                           event=lambda name, data: events.append((name, data))))
    after = mz.accuracy(model.handle, x, y)
    assert not model.handle.training
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["epochs"][-1]["eval_accuracy"] == pytest.approx(after, abs=1e-6)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and 0.5 in fractions and fractions[-1] == 1.0
    assert events == [("epoch", row) for row in report["epochs"]]  # one event per epoch, the report's curve
    # Measured: 0.97 before, 0.59 after pruning, 0.97+ after 2 epochs.
    assert after > max(0.95, after_prune + 0.2), (after_prune, after)


def test_finetune_keeps_unstructured_sparsity_exactly(zoo, tmp_path):
    model = PKG.load(zoo["cnn_package"], tmp_path)
    apply(model, PruneSpec(sparsity=0.8), {})
    zeros = {r.name: (r.read() == 0).clone() for r in PKG.eligible_weights(model)}
    spec = FinetuneSpec(epochs=1, optimizer="adamw", weight_decay=0.01)
    report = apply(model, spec, datasets("cnn"), index=1)
    assert report["zeros_kept"] == report["zeros_before"] > 0
    for ref in PKG.eligible_weights(model):
        assert bool((ref.read()[zeros[ref.name]] == 0).all())
    PKG.save(model, tmp_path / "tuned.zip")
    overall, _ = eligible_sparsity("package", tmp_path / "tuned.zip", tmp_path)
    assert overall == pytest.approx(0.8, abs=1e-4)


def test_finetune_is_deterministic_and_needs_labels(zoo, tmp_path):
    spec = FinetuneSpec(epochs=1, optimizer="sgd", lr=0.01, seed=3)
    states = []
    for _ in range(2):
        model = PKG.load(zoo["cnn_package"], tmp_path)
        apply(model, spec, datasets("cnn"))
        states.append(model.handle.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    model = PKG.load(zoo["cnn_package"], tmp_path)
    for data in (datasets("cnn", labels=False), {}):
        with pytest.raises(EngineError) as err:
            apply(model, spec, data)
        assert err.value.code == "bad_dataset"


def test_sandbox_channel_then_finetune_writes_smaller_pt2_and_onnx(packages, tmp_path):
    x_train, y_train, x_test, y_test = mz.digits_split()
    data = {"calibration": mz.write_npz(tmp_path / "c.npz", mz.as_images(x_train[:512]), y_train[:512]),
            "train": mz.write_npz(tmp_path / "t.npz", mz.as_images(x_train), y_train),
            "eval": mz.write_npz(tmp_path / "e.npz", mz.as_images(x_test), y_test)}
    recipe = {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5},
                        {"type": "finetune", "epochs": 1, "lr": 3e-3}],
              "evaluate": {"batch_sizes": [1, 64], "repeats": 10, "warmup": 2}}
    job = make_job(tmp_path, packages["cnn"], "package", recipe, ["pt2", "onnx"], data)
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert [a["name"] for a in result["artifacts"]] == ["model.pt2", "model.onnx", "report.png", "report.json"]
    m = result["metrics"]
    assert m["original"]["macs"] == 337_536 and m["compressed"]["macs"] == 86_848
    assert m["ratios"]["macs"] >= 3 and m["ratios"]["params"] >= 3
    assert isinstance(m["flags"], list) and "no_size_reduction" not in m["flags"]
    assert m["compressed"]["accuracy"] > 0.9
    shapes = {layer["name"]: (layer["shape"], layer["shape_after"]) for layer in m["layers"]}
    assert shapes["2.weight"] == ([32, 16, 3, 3], [16, 8, 3, 3])
    epochs = [line["data"]["epochs"] for line in lines if line["type"] == "event"
              and line["data"].get("type") == "finetune"]
    assert len(epochs) == 1 and len(epochs[0]) == 1
