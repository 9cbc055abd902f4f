"""The `int8` preset through HTTP against a real server and worker: a CNN package in, int8 ONNX out."""

from __future__ import annotations

from collections import Counter

import onnx
import onnxruntime as ort

from testing import modelzoo
from tests.conftest import new_team_key
from testing.stack import wait_for
from tests.test_e2e import FAST_REAPER, upload


def test_int8_preset_through_http(stack_factory, tmp_path):
    x_train, y_train, x_test, y_test = modelzoo.digits_split()
    cnn = modelzoo.train_cnn()
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "quant"))
    model = upload(client, "models", modelzoo.write_package(cnn, tmp_path / "cnn.zip", modelzoo.CNN_SOURCE))
    cal = upload(client, "datasets", modelzoo.write_npz(tmp_path / "cal.npz", modelzoo.as_images(x_train[:256])))
    eval_ds = upload(client, "datasets", modelzoo.write_npz(tmp_path / "eval.npz", modelzoo.as_images(x_test), y_test))

    refused = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {
        "steps": [{"type": "quantize", "method": "static_int8"}], "outputs": ["package"]}})
    assert refused.status_code == 422, refused.text
    assert "outputs[0]" in refused.text and "onnx" in refused.text

    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": "int8",
                                        "datasets": {"calibration": cal["id"], "eval": eval_ds["id"]}}).json()
    assert job["outputs"] == ["onnx"]
    job = wait_for(client, job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["ratios"]["size"] >= 3.0
    assert m["compressed"]["agreement"] >= 0.99 and m["ratios"]["accuracy_drop"] <= 0.005
    assert set(m["original"]["latency_ms"]) == set(m["compressed"]["latency_ms"]) == {"onnxruntime"}
    # The first layer stays float unless the ONNX writer measured it faster in int8 (the report says which); the
    # layer table and the file agree either way.
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    first = [n for n in report["notes"] if n.startswith("first layer(s) ['0.weight']: ")]
    assert len(first) == 1, report["notes"]
    first_bits = 8 if ": quantized " in first[0] else 32
    assert {layer["name"]: layer["bits"] for layer in m["layers"]} == {"0.weight": first_bits, "2.weight": 8,
                                                                        "6.weight": 8, "8.weight": 32}
    art = next(a for a in job["artifacts"] if a["format"] == "onnx")
    path = tmp_path / "int8.onnx"
    path.write_bytes(client.get(art["url"]).content)
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    int8 = sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2 for i in proto.graph.initializer)
    assert int8 == (3 if first_bits == 8 else 2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: modelzoo.as_images(x_test)})[0]
    assert abs(float((out.argmax(1) == y_test).mean()) - m["compressed"]["accuracy"]) < 1e-6


def test_int8_preset_on_a_batch_1_pt2_through_http(stack_factory, tmp_path):
    """A .pt2 exported with a batch-1 example (its batch fixed at 1), the int8 preset and only an eval dataset:
    calibrated batch by batch at the model's batch, timed at the batch it accepts, the skipped batch sizes and the
    eval-set calibration said in the report; every step_done and succeeded event has a message."""
    import numpy as np
    import torch

    _, _, x_test, y_test = modelzoo.digits_split()
    images = modelzoo.as_images(x_test)
    program = torch.export.export(modelzoo.train_cnn(epochs=2).eval(), (torch.from_numpy(images[:1]),))
    torch.export.save(program, str(tmp_path / "b1.pt2"))
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "quant1"))
    model = upload(client, "models", tmp_path / "b1.pt2")
    eval_ds = upload(client, "datasets", modelzoo.write_npz(tmp_path / "eval.npz", images, y_test))
    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": "int8",
                                        "datasets": {"eval": eval_ds["id"]}}).json()
    job = wait_for(client, job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["ratios"]["size"] >= 3.0 and m["size_ratio_output"] == "onnx"
    assert set(m["compressed"]["latency_ms"]["onnxruntime"]) == {"1"}  # batch 32 skipped: the model takes 1
    assert "calibrated_on_eval" in m["flags"] and "calibration dataset" in m["flag_reasons"]["calibrated_on_eval"]
    assert set(m["flags"]) == set(m["flag_reasons"])
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    skipped = [n for n in report["notes"] if "batch 32 skipped" in n]
    assert skipped and all('torch.export.Dim("batch")' in n for n in skipped), report["notes"]
    assert np.isfinite(m["compressed"]["agreement"]) and m["compressed"]["agreement"] >= 0.95
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    done = [e for e in events if e["type"] in ("step_done", "succeeded")]
    assert [e["type"] for e in done] == ["step_done", "succeeded"] and all(e["message"] for e in done), done
