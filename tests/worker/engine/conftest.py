"""Trained digits models in every input format, built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from testing import modelzoo as mz


@pytest.fixture(scope="session")
def digits():
    return mz.digits_split()


@pytest.fixture(scope="session")
def mlp():
    torch.set_num_threads(2)
    return mz.train_mlp()


@pytest.fixture(scope="session")
def cnn():
    return mz.train_cnn()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, digits, mlp, cnn) -> dict[str, Path]:
    """Model and dataset files: mlp.pt2, mlp.onnx, mlp.zip (with examples), cnn.zip (without), eval sets."""
    root = tmp_path_factory.mktemp("zoo")
    _, _, x_test, y_test = digits
    return {
        "pt2": mz.export_pt2(mlp, x_test, root / "mlp.pt2"),
        "onnx": mz.export_onnx(mlp, x_test, root / "mlp.onnx"),
        "package": mz.write_package(mlp, root / "mlp.zip", mz.MLP_SOURCE, example_inputs=[x_test[:2]]),
        "cnn_package": mz.write_package(cnn, root / "cnn.zip", mz.CNN_SOURCE),
        "eval": mz.write_npz(root / "eval.npz", x_test, y_test),
        "cnn_eval": mz.write_npz(root / "cnn_eval.npz", mz.as_images(x_test), y_test),
    }


def eligible_sparsity(fmt_name: str, path: Path, workdir: Path) -> tuple[float, dict[str, float]]:
    """Sparsity of the eligible weights of a model file, loaded from disk: overall and per layer."""
    from worker.engine.formats import get_format

    fmt = get_format(fmt_name)
    model = fmt.load(path, workdir)
    weights = {r.name: r.read() for r in fmt.eligible_weights(model)}
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / total, {n: float((w == 0).float().mean()) for n, w in weights.items()}


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
