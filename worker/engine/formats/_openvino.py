"""The `openvino` runtime: an ONNX model compiled by OpenVINO for the CPU, timed like any other runner.

OpenVINO comes with the worker extra (pyproject.toml); a worker without it fails a job that asks for it with
`runtime_unavailable`, at the job's start (`require_openvino`, from worker/engine/job/context.py) rather than after
its steps.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.formats.base import Runner

# Compiled models a runner keeps, one per input shape (predict's chunks and each timed batch size): a compiled
# model holds its own weights, so an unbounded cache would grow with every new shape.
MAX_COMPILED = 8


def require_openvino() -> Any:
    """The openvino module, or EngineError("runtime_unavailable") saying how to get it."""
    try:
        import openvino
    except ImportError as exc:
        raise EngineError("runtime_unavailable", f"evaluate.runtimes asks for openvino, which this worker cannot "
                                                 f"import ({type(exc).__name__}: {exc}): install the worker extra "
                                                 "(pip install 'squeeze[worker]') or remove openvino from "
                                                 "evaluate.runtimes") from exc
    return openvino


def properties(threads: int) -> dict[str, Any]:
    """How each model is compiled. Pinning off: on a shared host, pinned threads made a batch-1 call jump from 0.30
    to 2-4 ms (issue 19). One stream, latency hint: one request at a time, as the other runtimes are timed. f32
    precision: on a CPU with bf16 (AMX, AVX-512 BF16) OpenVINO would otherwise run float layers in bf16, so its
    outputs and its speed would not be those of the fp32 model the other runtimes run."""
    return {"INFERENCE_NUM_THREADS": max(1, threads), "ENABLE_CPU_PINNING": False, "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}


def onnx_runner(model_bytes: bytes, threads: int) -> Runner:
    """A runner of a serialized ONNX model on OpenVINO's CPU plugin: the first output as float32 numpy. A model
    with a dynamic dimension is reshaped to the static shapes of the inputs it is given and compiled once per
    distinct shape; `run.prepare(inputs)` compiles for a shape, so the latency code never times a compile."""
    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(model=model_bytes, weights=b"")
    dynamic = any(inp.get_partial_shape().is_dynamic for inp in model.inputs)
    props = properties(threads)
    compiled: OrderedDict[tuple, Any] = OrderedDict()

    def request(inputs: list[np.ndarray]):
        key = tuple(a.shape for a in inputs) if dynamic else ()
        if key in compiled:
            compiled.move_to_end(key)
            return compiled[key]
        graph = model
        if dynamic:
            graph = model.clone()
            graph.reshape({i: ov.PartialShape(list(a.shape)) for i, a in enumerate(inputs)})
        infer = core.compile_model(graph, "CPU", props).create_infer_request()
        compiled[key] = infer
        while len(compiled) > MAX_COMPILED:
            compiled.popitem(last=False)
        return infer

    def prepare(inputs: list[np.ndarray]) -> None:
        request(inputs)

    def run(inputs: list[np.ndarray]) -> np.ndarray:
        # The request's own calls, inputs shared rather than copied: `infer(inputs)` copied inputs and outputs into
        # dicts, 0.15 against 0.056 ms a call for a batch-1 MLP (ONNX Runtime: 0.026), overhead not the runtime's.
        infer = request(inputs)
        arrays = [np.ascontiguousarray(a) for a in inputs]
        for i, a in enumerate(arrays):
            infer.set_input_tensor(i, ov.Tensor(a, shared_memory=True))
        infer.infer()
        # a copy: the output tensor is the request's buffer, which the next call overwrites
        return np.array(infer.get_output_tensor(0).data, dtype=np.float32, copy=True)

    run.prepare = prepare  # type: ignore[attr-defined]
    return run
