"""Each compression step type through HTTP against a real server and worker, artifacts checked here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testing import modelzoo
from tests.conftest import new_team_key
from testing.stack import wait_for
from tests.test_e2e import FAST_REAPER, upload


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cnn")
    x_train, y_train, x_test, y_test = modelzoo.digits_split()
    cnn = modelzoo.train_cnn()
    return {
        "package": modelzoo.write_package(cnn, d / "cnn.zip", modelzoo.CNN_SOURCE),
        "pt2": modelzoo.export_pt2(cnn, modelzoo.as_images(x_test), d / "cnn.pt2"),
        "train": modelzoo.write_npz(d / "train.npz", modelzoo.as_images(x_train), y_train),
        "eval": modelzoo.write_npz(d / "eval.npz", modelzoo.as_images(x_test), y_test),
    }


def test_nm_cluster_channel_finetune_through_http(stack_factory, cnn_files, tmp_path):
    from worker.engine.compact import load_compact

    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=2)
    client = stack.client(new_team_key(stack.admin, "compress"))
    package = upload(client, "models", cnn_files["package"])
    pt2 = upload(client, "models", cnn_files["pt2"])
    train = upload(client, "datasets", cnn_files["train"])
    eval_ds = upload(client, "datasets", cnn_files["eval"])
    datasets = {"train": train["id"], "calibration": train["id"], "eval": eval_ds["id"]}
    evaluate = {"repeats": 5}
    jobs = {
        "2:4": client.post("/v1/jobs", json={"model_id": pt2["id"], "datasets": datasets, "recipe": {
            "steps": [{"type": "prune", "pattern": "2:4", "ignore": ["0.weight"]}], "outputs": ["pt2", "safetensors"],
            "evaluate": evaluate}}).json()["id"],
        # The default 20 timed runs: this job's no_speedup is a verdict on timings taken beside two other jobs on
        # two cores, and with 5 runs the noise once passed for a 5% gain (p90 under the original's median).
        "palette": client.post("/v1/jobs", json={"model_id": package["id"], "datasets": datasets, "recipe": {
            "steps": [{"type": "cluster", "clusters": 16}], "outputs": ["safetensors"]}}).json()["id"],
        "slim": client.post("/v1/jobs", json={"model_id": package["id"], "datasets": datasets, "recipe": {
            "steps": [{"type": "prune", "method": "channel", "sparsity": 0.5, "round_to": 4},
                      {"type": "finetune", "epochs": 1}], "evaluate": evaluate}}).json()["id"],
    }
    done = {name: wait_for(client, job_id, timeout=300) for name, job_id in jobs.items()}
    for name, job in done.items():
        assert job["status"] == "succeeded", (name, job["error"])

    nm = done["2:4"]
    assert nm["metrics"]["compressed"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # the ignored stem conv is dense
    st = next(a for a in nm["artifacts"] if a["format"] == "safetensors")
    path = tmp_path / "nm.safetensors"
    path.write_bytes(client.get(st["url"]).content)
    weights = {name: w for name, w in load_compact(path).items() if w.ndim >= 2}
    assert set(weights) > {"0.weight"}
    for name, w in weights.items():
        if name != "0.weight":  # at most 2 non-zeros in every 4 consecutive input channels
            groups = np.moveaxis(w, 1, -1).reshape(-1, 4)
            assert (np.count_nonzero(groups, axis=1) <= 2).all(), name
    assert st["size_bytes"] < nm["metrics"]["original"]["size_bytes"]

    palette = done["palette"]
    m = palette["metrics"]
    assert m["ratios"]["size"] >= 6, m["ratios"]
    assert m["ratios"]["accuracy_drop"] <= 0.02
    assert "no_speedup" in m["flags"]
    path = tmp_path / "palette.safetensors"
    path.write_bytes(client.get(next(a["url"] for a in palette["artifacts"] if a["format"] == "safetensors")).content)
    assert all(len(np.unique(w)) <= 16 for w in load_compact(path).values() if w.ndim >= 2)

    slim = done["slim"]
    m = slim["metrics"]
    assert slim["outputs"] == ["pt2", "onnx"]
    assert m["ratios"]["macs"] >= 2.5 and m["compressed"]["params"] < m["original"]["params"] * 0.5
    assert m["compressed"]["accuracy"] >= 0.85
    onnx_art = next(a for a in slim["artifacts"] if a["format"] == "onnx")
    path = tmp_path / "slim.onnx"
    path.write_bytes(client.get(onnx_art["url"]).content)
    import onnxruntime as ort

    x = modelzoo.as_images(modelzoo.digits_split()[2][:8])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (8, 10)
    events = client.get(f"/v1/jobs/{jobs['slim']}/events").json()["data"]
    assert any(e["type"] == "step_done" for e in events)



def test_transformer_mlp_width_pruned_through_http_loads_with_transformers(stack_factory, tmp_path):
    import zipfile

    import torch
    import transformers

    _, _, x_test, y_test = modelzoo.digits_split()
    bert = modelzoo.build_tiny_bert(epochs=2)
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    client = stack.client(new_team_key(stack.admin, "nlp"))
    model = upload(client, "models", modelzoo.write_hf_zip(bert, tmp_path / "bert.zip"))
    assert model["format"] == "hf"
    tokens = modelzoo.digits_tokens(x_test)
    eval_ds = upload(client, "datasets", modelzoo.write_npz(tmp_path / "eval.npz", {"input_ids": tokens}, y_test))
    job = client.post("/v1/jobs", json={"model_id": model["id"], "datasets": {"eval": eval_ds["id"]}, "recipe": {
        "steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}], "evaluate": {"repeats": 5}}}).json()
    assert job["outputs"] == ["hf"]
    job = wait_for(client, job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["compressed"]["params"] < m["original"]["params"] and m["ratios"]["macs"] > 1.2
    art = next(a for a in job["artifacts"] if a["format"] == "hf")
    folder = tmp_path / "pruned"
    (tmp_path / "pruned.zip").write_bytes(client.get(art["url"]).content)
    with zipfile.ZipFile(tmp_path / "pruned.zip") as zf:
        zf.extractall(folder)
    config_dir = next(p.parent for p in folder.rglob("config.json"))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(config_dir).eval()
    assert reloaded.config.intermediate_size == 32
    with torch.inference_mode():
        logits = reloaded(input_ids=torch.from_numpy(tokens)).logits
    assert logits.shape == (len(tokens), 10)
    # the downloaded folder is the model the job measured: same accuracy on the same eval set
    assert float((logits.argmax(1).numpy() == y_test).mean()) == pytest.approx(m["compressed"]["accuracy"], abs=1e-6)

    # Attention heads: a config cannot describe them, so hf output is refused at submit and graphs are the default.
    heads_step = {"type": "prune", "method": "channel", "sparsity": 0, "heads": 0.5}
    refused = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [heads_step],
                                                                              "outputs": ["hf"]}})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"]["errors"][0]["field"] == "recipe.outputs[0]"
    job = client.post("/v1/jobs", json={"model_id": model["id"], "datasets": {"eval": eval_ds["id"]}, "recipe": {
        "steps": [heads_step], "evaluate": {"repeats": 5}}}).json()
    assert job["outputs"] == ["pt2", "onnx"]
    job = wait_for(client, job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    step = next(e for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"] if e["type"] == "step_done")
    assert [b["heads_after"] for b in step["data"]["heads"]] == [2, 2]
    m = job["metrics"]
    assert m["ratios"]["macs"] > 1.2 and m["compressed"]["params"] < m["original"]["params"]
    art = next(a for a in job["artifacts"] if a["format"] == "onnx")
    (tmp_path / "heads.onnx").write_bytes(client.get(art["url"]).content)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "heads.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: tokens})[0]
    assert logits.shape == (len(tokens), 10)
    assert abs(float((logits.argmax(1) == y_test).mean()) - m["compressed"]["accuracy"]) <= 1 / len(y_test)


def test_distillation_through_http_with_a_teacher_model_and_the_gpu_queue(stack_factory, cnn_files, tmp_path):
    """PostgreSQL + Redis; a GPU queue configured and consumed by this (CPU) worker, so routing is visible."""
    stack = stack_factory("postgres", **FAST_REAPER, SQUEEZE_QUEUE_GPU="gpu")
    stack.start_api()
    stack.start_worker(concurrency=1, queues="cpu,gpu")
    client = stack.client(new_team_key(stack.admin, "distill"))
    student = upload(client, "models", cnn_files["package"])
    teacher = upload(client, "models", cnn_files["pt2"])  # the same CNN as a .pt2: a teacher in another format
    x_train, _, _, _ = modelzoo.digits_split()
    unlabelled = upload(client, "datasets", modelzoo.write_npz(tmp_path / "u.npz", modelzoo.as_images(x_train)))
    eval_ds = upload(client, "datasets", cnn_files["eval"])
    datasets = {"train": unlabelled["id"], "eval": eval_ds["id"]}
    slim = {"type": "prune", "method": "channel", "sparsity": 0.5, "dataset": "train"}

    def submit(steps, **recipe):
        return client.post("/v1/jobs", json={"model_id": student["id"], "datasets": datasets, "recipe": {
            "steps": steps, "outputs": ["onnx"], "evaluate": {"repeats": 3}, **recipe}})

    # A teacher id that is not this team's is a 404 naming the field; so is a made-up one.
    other = stack.client(new_team_key(stack.admin, "other-team"))
    foreign = upload(other, "models", cnn_files["pt2"])
    for ident in (foreign["id"], "mdl_doesnotexist"):
        r = submit([slim, {"type": "distill", "teacher": ident, "alpha": 1.0}])
        assert r.status_code == 404 and r.json()["error"]["details"]["field"] == "recipe.steps[1].teacher"

    label_free = submit([slim, {"type": "distill", "teacher": teacher["id"], "alpha": 1.0, "epochs": 2,
                                "lr": 3e-3, "keep": "best"}]).json()
    assert label_free["queue"] == "gpu"  # training jobs go to the GPU queue when one is configured
    needs_labels = submit([slim, {"type": "distill", "alpha": 0.5}]).json()
    on_cuda = submit([{"type": "prune", "sparsity": 0.5}], device="cuda").json()
    assert on_cuda["queue"] == "gpu"
    assert submit([{"type": "prune", "sparsity": 0.5}]).json()["queue"] == "cpu"

    job = wait_for(client, label_free["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["compressed"]["accuracy"] > 0.9 and job["metrics"]["ratios"]["macs"] > 3
    epochs = [e for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"] if e["type"] == "epoch"]
    assert [e["data"]["epoch"] for e in epochs] == [1, 2]
    assert all("eval_agreement" in e["data"] and "loss" in e["data"] for e in epochs)
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["steps"][1]["teacher_format"] == "pt2" and report["steps"][1]["label_free"]
    assert [row["epoch"] for row in report["steps"][1]["epochs"]] == [1, 2]

    failed = wait_for(client, needs_labels["id"], timeout=300)
    assert failed["status"] == "failed" and failed["error"]["code"] == "bad_dataset"
    assert "no labels" in failed["error"]["message"]
    failed = wait_for(client, on_cuda["id"], timeout=300)
    assert failed["status"] == "failed" and failed["error"]["code"] == "device_unavailable"
