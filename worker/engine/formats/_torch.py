"""Helpers shared by the torch-backed formats (pt2 and package): running, weight refs, ONNX export."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.formats.base import Runner, WeightRef, first_tensor


def plain(t: torch.Tensor) -> torch.Tensor:
    """A plain float tensor of `t`: torchao's quantized tensor subclasses dequantized."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "dequantize"):
        return t.detach().dequantize()
    return t.detach()


def is_dynamic_quantized(mod: Any) -> bool:
    """A Linear replaced by torch's eager dynamic int8 quantization."""
    return type(mod).__module__.startswith("torch.ao.nn.quantized.dynamic") and hasattr(mod, "_weight_bias")


def dynamic_quantized_ref(name: str, mod: Any) -> WeightRef:
    def read() -> torch.Tensor:
        return mod._weight_bias()[0].dequantize()

    def write(new: torch.Tensor) -> None:
        from worker.engine.errors import EngineError

        raise EngineError("unsupported", f"{name} is int8 (dynamic quantization); a step cannot edit it")

    return WeightRef(name=name, shape=tuple(read().shape), read=read, write=write)


def tensor_ref(name: str, t: torch.Tensor) -> WeightRef:
    def read() -> torch.Tensor:
        return plain(t)

    def write(new: torch.Tensor) -> None:
        # In place: the exported program, its module() and the state dict share this storage.
        with torch.no_grad():
            t.copy_(new.to(dtype=t.dtype))

    return WeightRef(name=name, shape=tuple(t.shape), read=read, write=write)


def module_runner(module: Any, threads: int, runtime: str = "torch") -> Runner:
    """Runs `module` eagerly (`torch`) or compiled by inductor (`torch-compile`).

    Compiled: static shapes (`dynamic=False`; a dynamic batch hit an inductor assertion in int8 conv) with freezing
    (weights folded as constants, which PT2E int8 graphs need for their int8 kernels, bench/RESULTS.md). Each new input
    shape is a compile: `run.prepare(inputs)` compiles for a shape, and the latency code calls it before its warmup
    so compile time is never timed.
    """
    torch.set_num_threads(max(1, threads))
    if runtime == "torch-compile":
        return _compiled_runner(module)
    if runtime != "torch":
        from worker.engine.errors import EngineError

        raise EngineError("unsupported", f"a torch model runs on torch or torch-compile, not {runtime}")

    def run(inputs: list[np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        with torch.inference_mode():
            out = first_tensor(module(*args))
        return out.detach().float().numpy()

    return run


def _compiled_runner(module: Any) -> Runner:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # One graph per batch size (and per predict chunk): more than dynamo's default of 8 recompiles, after which it
    # would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Compile in this process: the sandbox limits processes, and a pool of compile workers gains nothing here.
    inductor_config.compile_threads = 1
    compiled = torch.compile(module, dynamic=False)
    seen: set[tuple] = set()

    def call(inputs: list[np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        with torch.no_grad(), inductor_config.patch(freezing=True):
            out = first_tensor(compiled(*args))
        return out.detach().float().numpy()

    def prepare(inputs: list[np.ndarray]) -> None:
        key = tuple((x.shape, str(x.dtype)) for x in inputs)
        if key not in seen:
            call(inputs)
            seen.add(key)

    def run(inputs: list[np.ndarray]) -> np.ndarray:
        prepare(inputs)
        return call(inputs)

    run.prepare = prepare  # type: ignore[attr-defined]
    return run


def to_tensors(arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def batch_of(arrays: list[np.ndarray], n: int = 2) -> list[np.ndarray]:
    """`n` rows of each input (repeating rows if fewer): a batch of 1 would make export specialise the batch dim."""
    out = []
    for a in arrays:
        idx = np.arange(n) % max(1, a.shape[0])
        out.append(np.ascontiguousarray(a[idx]))
    return out


def export_onnx(model: Any, examples: list[np.ndarray] | None, path: Path, dynamic_batch: bool) -> list[str]:
    """Write `model` (nn.Module or ExportedProgram) as one ONNX file with a dynamic batch dim.

    Tries the dynamo exporter first; if it fails and `model` is eager, falls back to the TorchScript
    exporter and says so in the returned notes.
    """
    notes: list[str] = []
    is_ep = isinstance(model, torch.export.ExportedProgram)
    if examples is None and not is_ep:
        from worker.engine.errors import EngineError

        raise EngineError("bad_dataset", "exporting to ONNX needs example inputs: add example_inputs.safetensors "
                                         "to the package or give an eval dataset")
    args = to_tensors(batch_of(examples)) if examples is not None else None
    if is_ep and args is None:
        ex = model.example_inputs
        args = tuple(ex[0]) if ex else None
    n_inputs = len(args) if args is not None else 1
    input_names = [f"input_{i}" for i in range(n_inputs)]
    dynamic_shapes = None
    if dynamic_batch and not is_ep:
        dynamic_shapes = tuple({0: torch.export.Dim("batch")} for _ in range(n_inputs))
    try:
        # The exporter prints progress to stdout; in the sandbox stdout already points at stderr.
        torch.onnx.export(
            model, args, str(path), dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes,
            input_names=None if is_ep else input_names, output_names=["output"], optimize=True,
        )
        notes.append("onnx: written by the dynamo exporter")
        return notes
    except Exception as exc:  # the dynamo exporter fails on some graphs the TorchScript exporter handles
        first_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    eager = model.module() if is_ep else model
    if args is None:
        from worker.engine.errors import EngineError

        raise EngineError("unsupported", f"dynamo ONNX export failed ({first_error}) and no example inputs "
                                         "are available for the fallback exporter")
    dynamic_axes = {n: {0: "batch"} for n in [*input_names, "output"]} if dynamic_batch else None
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(eager, args, str(path), dynamo=False, input_names=input_names, output_names=["output"],
                          dynamic_axes=dynamic_axes, opset_version=17)
    notes.append(f"onnx: dynamo exporter failed ({first_error}); fell back to dynamo=False")
    return notes
