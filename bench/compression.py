"""Compression benchmarks: reference models trained on sklearn's digits, recipes run through the HTTP API
of a running server (embedded default: SQLite + filesystem broker + one worker, one job at a time so
latencies are not disturbed), one row per (model, recipe) with the measured ratios."""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.recipes import PRESETS
from testing import modelzoo
from testing.stack import Stack, make_backend, wait_for

FINETUNE_3 = {"type": "finetune", "dataset": "train", "epochs": 3, "lr": 1e-3, "batch_size": 64}
INT8 = {"type": "quantize", "method": "static_int8", "dataset": "calibration"}
# lr 3e-3 with a cosine schedule: measured on this ResNet, 99.17% (labels) / 98.89% (label-free) after 3 epochs
# against 98.61% / 98.33% at a constant 1e-3.
DISTILL_3 = {"type": "distill", "teacher": "original", "dataset": "train", "epochs": 3, "lr": 3e-3,
             "schedule": "cosine", "batch_size": 64, "temperature": 4, "alpha": 0.7}
# Each job's full report.json, committed beside the summary rows.
REPORTS = Path(__file__).resolve().parent / "results" / "reports"
# A small BERT (2 layers, hidden 128, about 300k parameters; the tests' is 26k). A constant lr left the hidden-96 one
# at 63% (its low margins made agreement a coin toss); one-cycle, 30 epochs: 91.7% at hidden 128 (measured).
BERT_EPOCHS = 30
BERT_SIZE = {"hidden": 128, "intermediate": 256, "lr": 1e-3, "one_cycle": True}
EVALUATE = {"batch_sizes": [1, 32], "repeats": 30, "warmup": 5}

# name -> (model, recipe[, dataset role -> uploaded file role, where not the same name])
CASES: dict[str, tuple] = {
    "mlp_prune50": ("mlp", {"steps": [{"type": "prune", "sparsity": 0.5}], "outputs": ["pt2", "safetensors"]}),
    "cnn_unstructured80_finetune3": ("cnn", {"steps": [{"type": "prune", "sparsity": 0.8}, FINETUNE_3],
                                             "outputs": ["safetensors", "pt2"]}),
    "cnn_2of4": ("cnn", {"steps": [{"type": "prune", "pattern": "2:4", "ignore": ["0.weight"]}],  # 1 input channel
                         "outputs": ["pt2", "safetensors"]}),
    "resnet_slim50_finetune3": ("resnet", {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5,
                                                      "importance": "l2", "round_to": 8}, FINETUNE_3],
                                           "outputs": ["pt2", "onnx"]}),
    "resnet_palette16": ("resnet", {"steps": [{"type": "cluster", "clusters": 16}], "outputs": ["safetensors"]}),
    "bert_mlp_width50": ("bert", {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}],
                                  "outputs": ["hf", "onnx"]}),
    "resnet_slim50_distill3": ("resnet", {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5,
                                                     "importance": "l2", "round_to": 8}, DISTILL_3],
                                          "outputs": ["pt2", "onnx"]}),
    # The same without labels anywhere in training: the train set is uploaded without them (alpha 1).
    "resnet_slim50_distill3_label_free": ("resnet", {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5,
                                                                "importance": "l2", "round_to": 8},
                                                               {**DISTILL_3, "alpha": 1.0}],
                                                     "outputs": ["pt2", "onnx"]}, {"train": "train_unlabelled",
                                                                                   "calibration": "train_unlabelled"}),
    # Quantization: int8 ONNX timed against the same model's fp32 ONNX export in ONNX Runtime (and eager torch).
    "cnn_int8_onnx": ("cnn", {"steps": [INT8], "outputs": ["onnx"], "evaluate": {"runtimes": ["onnxruntime", "torch"]}}),
    "resnet_int8_onnx": ("resnet", {"steps": [INT8], "outputs": ["onnx"],
                                    "evaluate": {"runtimes": ["onnxruntime", "torch"]}}),
    # The same two timed as served with one thread per replica (evaluate.threads: 1).
    "cnn_int8_onnx_1thread": ("cnn", {"steps": [INT8], "outputs": ["onnx"],
                                      "evaluate": {"runtimes": ["onnxruntime"], "threads": 1}}),
    "resnet_int8_onnx_1thread": ("resnet", {"steps": [INT8], "outputs": ["onnx"],
                                            "evaluate": {"runtimes": ["onnxruntime"], "threads": 1}}),
    "cnn_int8_pt2_compiled": ("cnn", {"steps": [INT8], "outputs": ["pt2"], "evaluate": {"runtimes": ["torch-compile"]}}),
    "resnet_int8_pt2_compiled": ("resnet", {"steps": [INT8], "outputs": ["pt2"],
                                            "evaluate": {"runtimes": ["torch-compile"]}}),
    "bert_int8_dynamic": ("bert", {"steps": [{"type": "quantize", "method": "dynamic_int8"}], "outputs": ["onnx"],
                                   "evaluate": {"runtimes": ["onnxruntime"]}}),
    "mlp_binary": ("mlp", {"steps": [{"type": "quantize", "method": "binary"}], "outputs": ["safetensors"]}),
    # The preset as a user runs it, also timed in eager PyTorch: the bar is against the eager fp32 original.
    "resnet_slim50_distill3_int8": ("resnet", {**PRESETS["slim-50-distill"]["recipe"],
                                               "evaluate": {"runtimes": ["onnxruntime", "torch"]}}),
    # The most visible preset as a newcomer runs it: no outputs named, so the defaults (the input's format and the
    # compact safetensors of the pruned weights).
    "resnet_prune50_preset": ("resnet", PRESETS["prune-50"]["recipe"]),
    "bert_heads50_mlp50_finetune3": ("bert", {"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5,
                                                          "heads": 0.5}, FINETUNE_3], "outputs": ["pt2", "onnx"]}),
}


def _models(workdir: Path, wanted: set[str]) -> dict[str, dict[str, Path]]:
    """The reference models the cases use (`wanted`: trained only when a case needs them), with their datasets."""
    x_train, y_train, x_test, y_test = modelzoo.digits_split()
    out: dict[str, dict[str, Path]] = {}
    if "mlp" in wanted:
        out["mlp"] = _mlp(workdir, x_train, y_train, x_test, y_test)
    if "cnn" in wanted:
        out["cnn"] = _cnn(workdir, x_train, y_train, x_test, y_test)
    if "resnet" in wanted:
        out["resnet"] = _resnet(workdir, x_train, y_train, x_test, y_test)
    if "bert" in wanted:
        out["bert"] = _bert(workdir, x_train, y_train, x_test, y_test)
    return out


def _mlp(workdir: Path, x_train, y_train, x_test, y_test) -> dict[str, Path]:
    mlp = modelzoo.train_mlp(source=modelzoo.MLP_BENCH_SOURCE)
    return {"model": modelzoo.export_pt2(mlp, x_test, workdir / "mlp.pt2"),
            "train": modelzoo.write_npz(workdir / "mlp-train.npz", x_train, y_train),
            "eval": modelzoo.write_npz(workdir / "mlp-eval.npz", x_test, y_test)}


def _cnn(workdir: Path, x_train, y_train, x_test, y_test) -> dict[str, Path]:
    cnn = modelzoo.train_cnn(source=modelzoo.CNN_BENCH_SOURCE)
    return {"model": modelzoo.write_package(cnn, workdir / "cnn.zip", modelzoo.CNN_BENCH_SOURCE),
            "train": modelzoo.write_npz(workdir / "cnn-train.npz", modelzoo.as_images(x_train), y_train),
            "eval": modelzoo.write_npz(workdir / "cnn-eval.npz", modelzoo.as_images(x_test), y_test)}


def _resnet(workdir: Path, x_train, y_train, x_test, y_test) -> dict[str, Path]:
    size = modelzoo.RESNET_BENCH_SIZE
    resnet = modelzoo.train_resnet(source=modelzoo.RESNET_BENCH_SOURCE, size=size)
    return {"model": modelzoo.write_package(resnet, workdir / "resnet.zip", modelzoo.RESNET_BENCH_SOURCE),
            "train": modelzoo.write_npz(workdir / "resnet-train.npz", modelzoo.as_resnet_input(x_train, size),
                                        y_train),
            "train_unlabelled": modelzoo.write_npz(workdir / "resnet-train-unlabelled.npz",
                                                   modelzoo.as_resnet_input(x_train, size)),
            "eval": modelzoo.write_npz(workdir / "resnet-eval.npz", modelzoo.as_resnet_input(x_test, size), y_test)}


def _bert(workdir: Path, x_train, y_train, x_test, y_test) -> dict[str, Path]:
    bert = modelzoo.build_tiny_bert(epochs=BERT_EPOCHS, **BERT_SIZE)
    return {"model": modelzoo.write_hf_zip(bert, workdir / "bert.zip"),
            "train": modelzoo.write_npz(workdir / "bert-train.npz", {"input_ids": modelzoo.digits_tokens(x_train)},
                                        y_train),
            "eval": modelzoo.write_npz(workdir / "bert-eval.npz", {"input_ids": modelzoo.digits_tokens(x_test)},
                                       y_test)}


def _row(job: dict) -> dict:
    m = job["metrics"]
    o, c, r = m["original"], m["compressed"], m["ratios"]
    latency = {}
    for runtime, per_batch in (r.get("latency") or {}).items():
        for batch, ratio in per_batch.items():
            latency[f"speedup_{runtime}_b{batch}"] = ratio
    sizes = {a["format"]: a["size_bytes"] for a in job["artifacts"]}
    return {
        "status": job["status"],
        "original_bytes": o["size_bytes"],
        **{f"{fmt}_bytes": size for fmt, size in sizes.items() if fmt != "json"},
        "size_ratio": r.get("size"),
        "safetensors_size_ratio": r.get("safetensors_size"),
        "macs_ratio": r.get("macs"),
        **latency,
        # An ONNX result against the original in eager PyTorch (the user's starting point), largest batch.
        **_vs_eager(o, c),
        "accuracy_before": o.get("accuracy"),
        "accuracy_after": c.get("accuracy"),
        "accuracy_drop": r.get("accuracy_drop"),
        "agreement": c.get("agreement"),
        "flags": m.get("flags", []),
        "wall_s": job.get("wall_s"),
    }


def _vs_eager(original: dict, compressed: dict) -> dict:
    eager = (original.get("latency_ms") or {}).get("torch") or {}
    onnx = (compressed.get("latency_ms") or {}).get("onnxruntime") or {}
    common = [b for b in eager if b in onnx]
    if not common:
        return {}
    b = max(common, key=int)
    return {f"speedup_vs_eager_torch_b{b}": round(eager[b]["median"] / onnx[b]["median"], 4)}


def bench_compression(workdir: Path, cases: list[str] | None = None) -> dict:
    cases = cases or list(CASES)
    files = _models(workdir, {CASES[case][0] for case in cases})
    data_dir = workdir / "server"
    data_dir.mkdir()
    stack = Stack(make_backend("sqlite", data_dir), data_dir, workdir, SQUEEZE_SANDBOX_THREADS="2")
    results = {}
    try:
        stack.start_api()
        stack.start_worker(concurrency=1)
        key = stack.admin.post("/v1/keys", json={"team": "bench"}).json()["key"]
        client = stack.client(key)
        uploaded: dict[str, dict[str, str]] = {}
        for name, paths in files.items():
            uploaded[name] = {
                role: client.post(f"/v1/{'models' if role == 'model' else 'datasets'}",
                                  params={"name": path.name}, content=path.read_bytes()).json()["id"]
                for role, path in paths.items()}
        for case in cases:
            model_name, recipe, *roles = CASES[case]
            ids = uploaded[model_name]
            roles = {"train": "train", "calibration": "train", "eval": "eval", **(roles[0] if roles else {})}
            started = time.monotonic()
            job = client.post("/v1/jobs", json={"model_id": ids["model"],
                                                "datasets": {role: ids[f] for role, f in roles.items()},
                                                "recipe": {**recipe, "evaluate": {**EVALUATE,
                                                                                   **recipe.get("evaluate", {})}}}).json()
            if "id" not in job:
                results[case] = {"status": "refused", "error": job}
                continue
            job = wait_for(client, job["id"], timeout=1800, interval=0.5)
            job["wall_s"] = round(time.monotonic() - started, 1)
            if any(a["name"] == "report.json" for a in job["artifacts"]):  # kept: tests validate them all
                REPORTS.mkdir(parents=True, exist_ok=True)
                report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
                (REPORTS / f"{case}.json").write_text(json.dumps(report, indent=1) + "\n")
            results[case] = _row(job) if job["status"] == "succeeded" else {"status": job["status"],
                                                                             "error": job["error"]}
    finally:
        stack.stop()
    return {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
            for name, row in results.items()}



def merge(rows: dict[str, dict], command: str) -> Path:
    """Cases run on their own (`python -m bench.compression CASE ...`) merged into bench/results/compression.json:
    the other rows kept as they were measured, each rerun row stamped with the date and CPU flags it ran on (the
    file's environment is the last whole-suite run's), and bench/RESULTS.md rendered again."""
    from bench.run import RESULTS, environment, hand_notes, render

    path = RESULTS / "compression.json"
    result = json.loads(path.read_text())
    env = environment()
    for figures in rows.values():
        figures["measured"] = f"{env['date']}, {env['cores']} cores, CPU flags {env['cpu_flags']}"
    result["results"].update(rows)
    result["rerun"] = command
    path.write_text(json.dumps(result, indent=2) + "\n")
    everything = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    target = RESULTS.parent / "RESULTS.md"
    target.write_text(render(everything) + hand_notes(target))
    return path


if __name__ == "__main__":  # python -m bench.compression CASE ...: those cases run again, merged into the results
    import sys
    import tempfile

    names = sys.argv[1:]
    if not names or set(names) - set(CASES):
        sys.exit(f"usage: python -m bench.compression CASE ... (cases: {' '.join(CASES)})")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as scratch:
        done = bench_compression(Path(scratch), names)
    print(json.dumps(done, indent=2))
    print(merge(done, f"python -m bench.compression {' '.join(names)} ({round(time.time() - started, 1)} s)"))
