"""Measurements of a model: size, parameters, sparsity, MACs, latency per runtime, accuracy and fidelity."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, Runner


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


def _prepare(run: Runner, x: list[np.ndarray]) -> None:
    """One-time work for this input shape (a torch.compile compile), so it is never timed, whatever `warmup`."""
    prepare = getattr(run, "prepare", None)
    if prepare is not None:
        prepare(x)


def fixed_batch_why(fixed_batch: int) -> str:
    """Why a batch size was not timed, and what to change."""
    return (f"the model has a fixed batch of {fixed_batch} (to time other batch sizes, export it with "
            'dynamic_shapes={"x": {0: torch.export.Dim("batch")}} and an example of batch >= 2)')


def latency(run: Runner, inputs: list[np.ndarray], batch_sizes: list[int], warmup: int, repeats: int,
            fixed_batch: int | None, notes: list[str], label: str) -> dict[str, dict[str, float]]:
    """{batch: {median, p90}} in ms; batch sizes a fixed-batch model cannot take are left out with a note."""
    out: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        if fixed_batch and b != fixed_batch:
            notes.append(f"{label}: batch {b} skipped, {fixed_batch_why(fixed_batch)}")
            continue
        x = batch_inputs(inputs, b)
        _prepare(run, x)
        for _ in range(warmup):
            run(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x)
            times.append((time.perf_counter() - t0) * 1000.0)
        out[str(b)] = {"median": round(float(np.median(times)), 4), "p90": round(float(np.percentile(times, 90)), 4)}
    return out


def latency_pair(run_a: Runner, run_b: Runner, inputs: list[np.ndarray], batch_sizes: list[int], warmup: int,
                 repeats: int, fixed_batch: int | None, notes: list[str] | None = None,
                 label: str = "") -> tuple[dict, dict]:
    """Latency of two models timed alternately (a, b, a, b, ...), so a change in machine load during the job
    hits both alike: the ratio of the medians is then a fair comparison. Same shape as `latency`; batch sizes a
    fixed-batch model cannot take are left out, with a note in `notes` when given."""
    out_a: dict[str, dict[str, float]] = {}
    out_b: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        if fixed_batch and b != fixed_batch:
            if notes is not None:
                notes.append(f"{label}: batch {b} skipped, {fixed_batch_why(fixed_batch)}")
            continue
        x = batch_inputs(inputs, b)
        _prepare(run_a, x)
        _prepare(run_b, x)
        for _ in range(warmup):
            run_a(x)
            run_b(x)
        times_a, times_b = [], []
        for _ in range(repeats):
            for run, times in ((run_a, times_a), (run_b, times_b)):
                t0 = time.perf_counter()
                run(x)
                times.append((time.perf_counter() - t0) * 1000.0)
        for out, times in ((out_a, times_a), (out_b, times_b)):
            out[str(b)] = {"median": round(float(np.median(times)), 4),
                           "p90": round(float(np.percentile(times, 90)), 4)}
    return out_a, out_b


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
    out = {
        "size": div(original["size_bytes"], compressed["size_bytes"]),
        "params": div(original["params"], compressed["params"]),
        "nonzero_params": div(original["nonzero_params"], compressed["nonzero_params"]),
        "latency": lat,
        "accuracy_drop": round(acc_o - acc_c, 6) if acc_o is not None and acc_c is not None else None,
    }
    if "macs" in original or "macs" in compressed:  # measured by the sandbox; None when it could not count
        out["macs"] = div(original.get("macs"), compressed.get("macs"))
    return out


# A ratio under this is noise, not a gain: the report flags it (worker/engine/job/flags.py) so "compressed"
# never oversells.
MEANINGFUL_GAIN = 1.05


def macs(model: LoadedModel, inputs: list[np.ndarray] | None = None) -> int | None:
    """Multiply-accumulates of one sample (batch 1; a fixed-batch model is counted at its batch and divided).

    torch models: FlopCounterMode over one forward (flops / 2). ONNX: Conv/ConvTranspose/Gemm/MatMul from
    shape inference with the batch dim set to 1. None when it cannot be counted (unknown input shapes, a
    model that does not run on the given inputs, dynamic dims shape inference cannot resolve).
    """
    fmt = get_format(model.format)
    try:
        if model.format == "onnx":
            return _onnx_macs(model.handle)
        inputs = inputs or fmt.example_inputs(model)
        if not inputs:
            return None
        batch = fmt.fixed_batch(model) or 1
        return _torch_macs(_torch_callable(model), batch_inputs(inputs, batch)) // batch
    except Exception:  # noqa: BLE001  (a count is a nice-to-have: never fail a job over it)
        return None


def _torch_callable(model: LoadedModel):
    import torch

    handle = model.handle
    return handle.module() if isinstance(handle, torch.export.ExportedProgram) else handle


def _torch_macs(module, inputs: list[np.ndarray]) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args)
    return int(counter.get_total_flops()) // 2


def _onnx_macs(proto) -> int | None:
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inits = {i.name: tuple(int(d) for d in i.dims) for i in graph.initializer}
    for inp in graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    batch = 1
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim if inp.name not in inits else []
        if len(dims) and dims[0].HasField("dim_value"):
            batch = max(1, int(dims[0].dim_value))
            break
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[int, ...] | None] = dict(inits)
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
        else:
            shapes.setdefault(vi.name, None)

    def size(name: str) -> int:
        shape = shapes.get(name)
        if shape is None:
            raise ValueError(f"unknown shape of {name!r}")
        return int(np.prod(shape, dtype=np.int64))

    total = 0
    for node in model.graph.node:
        op = node.op_type
        if op == "Conv" or op == "ConvInteger":  # each output element: Cin/groups * prod(kernel) MACs = prod(W.shape[1:])
            total += size(node.output[0]) * int(np.prod(shapes[node.input[1]][1:]))
        elif op == "ConvTranspose":  # each input element scatters into Cout/groups * prod(kernel)
            total += size(node.input[0]) * int(np.prod(shapes[node.input[1]][1:]))
        elif op == "Gemm":
            a = shapes[node.input[0]]
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += size(node.output[0]) * (a[0] if trans_a else a[1])
        elif op == "MatMul" or op == "MatMulInteger":  # (the int8 forms of dynamic quantization)
            a = shapes[node.input[0]]
            total += size(node.output[0]) * a[-1]
    return total // batch
