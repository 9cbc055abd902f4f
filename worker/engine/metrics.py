"""Measurements of a model: size, parameters, sparsity, latency per runtime, accuracy and fidelity."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, Runner, get_format


def model_stats(model: LoadedModel, path: Path) -> dict:
    """Size on disk, parameter counts and sparsity (of eligible weights, and of all parameters)."""
    fmt = get_format(model.format)
    params = fmt.parameters(model)
    total = sum(int(t.numel()) for _, t in params)
    nonzero = sum(int((t != 0).sum()) for _, t in params)
    eligible = [r.read() for r in fmt.eligible_weights(model)]
    e_total = sum(int(t.numel()) for t in eligible)
    e_zero = sum(int((t == 0).sum()) for t in eligible)
    return {
        "format": model.format,
        "size_bytes": path.stat().st_size,
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": round(e_zero / e_total, 6) if e_total else 0.0,
        "sparsity_overall": round(1 - nonzero / total, 6) if total else 0.0,
        "eligible_params": e_total,
    }


def layer_sparsity(model: LoadedModel) -> dict[str, dict]:
    return {r.name: {"shape": list(r.shape), "sparsity": round(float((r.read() == 0).sum()) / max(1, int(np.prod(r.shape))), 6)}
            for r in get_format(model.format).eligible_weights(model)}


def predict(run: Runner, inputs: list[np.ndarray], fixed_batch: int | None, chunk: int = 256) -> np.ndarray:
    """Outputs for all samples, in chunks (of the model's fixed batch, padding the last one, when it has one)."""
    n = inputs[0].shape[0]
    step = fixed_batch or chunk
    outs = []
    for start in range(0, n, step):
        part = [a[start:start + step] for a in inputs]
        m = part[0].shape[0]
        if fixed_batch and m < fixed_batch:
            idx = np.arange(fixed_batch) % m
            part = [a[idx] for a in part]
        outs.append(np.asarray(run(part))[:m])
    return np.concatenate(outs, axis=0)


def batch_inputs(inputs: list[np.ndarray], batch: int) -> list[np.ndarray]:
    idx = np.arange(batch) % inputs[0].shape[0]
    return [np.ascontiguousarray(a[idx]) for a in inputs]


def latency(run: Runner, inputs: list[np.ndarray], batch_sizes: list[int], warmup: int, repeats: int,
            fixed_batch: int | None, notes: list[str], label: str) -> dict[str, dict[str, float]]:
    """{batch: {median, p90}} in ms; batch sizes a fixed-batch model cannot take are left out with a note."""
    out: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        if fixed_batch and b != fixed_batch:
            notes.append(f"{label}: batch {b} skipped, the model has a fixed batch of {fixed_batch}")
            continue
        x = batch_inputs(inputs, b)
        for _ in range(warmup):
            run(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x)
            times.append((time.perf_counter() - t0) * 1000.0)
        out[str(b)] = {"median": round(float(np.median(times)), 4), "p90": round(float(np.percentile(times, 90)), 4)}
    return out


def accuracy(outputs: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None or outputs.ndim != 2:
        return None
    return round(float((outputs.argmax(axis=1) == labels[: outputs.shape[0]]).mean()), 6)


def fidelity(reference: np.ndarray, outputs: np.ndarray) -> dict[str, float | None]:
    """Top-1 agreement, mean per-sample cosine similarity and max abs error of outputs against the reference."""
    if reference.shape != outputs.shape:
        raise EngineError("bad_model", f"the result's output shape {outputs.shape} differs from the original's "
                                       f"{reference.shape}")
    a = reference.reshape(reference.shape[0], -1).astype(np.float64)
    b = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    agreement = float((a.argmax(axis=1) == b.argmax(axis=1)).mean()) if a.shape[1] > 1 else None
    return {"agreement": None if agreement is None else round(agreement, 6), "cosine": round(float(cos.mean()), 6),
            "max_abs_error": float(np.abs(a - b).max())}


def ratios(original: dict, compressed: dict) -> dict:
    def div(x, y):
        return round(x / y, 4) if x is not None and y else None

    lat: dict[str, dict[str, float | None]] = {}
    for rt, by_batch in original.get("latency_ms", {}).items():
        other = compressed.get("latency_ms", {}).get(rt, {})
        common = {b: div(v["median"], other[b]["median"]) for b, v in by_batch.items() if b in other}
        if common:
            lat[rt] = common
    acc_o, acc_c = original.get("accuracy"), compressed.get("accuracy")
    return {
        "size": div(original["size_bytes"], compressed["size_bytes"]),
        "params": div(original["params"], compressed["params"]),
        "nonzero_params": div(original["nonzero_params"], compressed["nonzero_params"]),
        "latency": lat,
        "accuracy_drop": round(acc_o - acc_c, 6) if acc_o is not None and acc_c is not None else None,
    }
