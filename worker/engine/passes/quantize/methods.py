"""The quantization methods, one registered handler each (as passes are registered by step type).

A handler quantizes a `QuantTask`'s target layers in place and returns the names of those it quantized; a graph
method on a torch model may instead record a `QuantPlan` on the task, applied when an output is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from app.recipes import QuantizeSpec
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, WeightRef
from worker.engine.passes.base import StepContext
from worker.engine.passes.quantize import eager
from worker.engine.passes.quantize.plan import GRAPH_TARGETS, QuantPlan


@dataclass
class QuantTask:
    """One quantize step's layers and choices, as its method handler gets them."""

    model: LoadedModel
    spec: QuantizeSpec
    ctx: StepContext
    outputs: list[str]
    eligible: list[WeightRef]
    targets: list[WeightRef]
    kept: dict[str, str]  # layer -> why it stays float
    first_by_default: list[str]  # kept float only by static_int8's default: ONNX output may quantize them
    calibration: list[np.ndarray] | None
    before: dict[str, torch.Tensor]  # every eligible weight before the step
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific fields of the step report
    plan: QuantPlan | None = None


class Method:
    bits: ClassVar[int]

    def quantize(self, task: QuantTask) -> list[str]:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise RuntimeError(f"quantize method {name!r} already has a handler: {METHODS[name].__name__}")
        METHODS[name] = cls
        return cls

    return deco


def handler_for(name: str) -> Method:
    cls = METHODS.get(name)
    if cls is None:
        raise EngineError("unsupported", f"no handler for quantize method {name!r}; known: {sorted(METHODS)}")
    return cls()


class _GraphMethod(Method):
    """int8 whose fast kernels live in a runtime's graph: ONNX Runtime now (ONNX model) or when written."""

    bits = 8

    def quantize(self, task: QuantTask) -> list[str]:
        model, outputs = task.model, task.outputs
        kernel = None
        if model.format == "onnx" or "onnx" in outputs:
            # ONNX Runtime quantizes: weights of the range this CPU's int8 kernels compute exactly.
            from worker.engine.passes.quantize.int8_kernel import host_int8_kernel, int8_kernel_note

            kernel = host_int8_kernel()
            task.notes.append(int8_kernel_note(kernel))
        if model.format == "onnx":
            done = _onnx_now(task, kernel)
        elif any(o in GRAPH_TARGETS[task.spec.method] for o in outputs):
            done = self._plan(task, kernel)
        else:
            done = self.without_graph(task)
        if kernel is not None:
            task.extra["int8_kernel"] = kernel
        return done

    def _plan(self, task: QuantTask, kernel: dict | None) -> list[str]:
        spec, model, outputs = task.spec, task.model, task.outputs
        eager_too = spec.method == "dynamic_int8" and "package" in outputs
        task.plan = QuantPlan(spec=spec, source=copy.deepcopy(model.handle) if eager_too else model.handle,
                              layers=[r.name for r in task.eligible], quantized=[r.name for r in task.targets],
                              kept=task.kept, calibration=task.calibration, first_by_default=task.first_by_default,
                              timing=task.ctx.timing, int8_kernel=kernel)
        written = [o for o in outputs if o in GRAPH_TARGETS[spec.method]]
        task.notes.append(f"{spec.method} is applied when writing {written}: the exported float graph is quantized "
                          + ("by ONNX Runtime" if written == ["onnx"] else "(ONNX: ONNX Runtime; pt2: PT2E, X86 "
                                                                           "inductor quantizer)"))
        return _eager_dynamic(task) if eager_too else [r.name for r in task.targets]

    def without_graph(self, task: QuantTask) -> list[str]:
        raise EngineError("unsupported", f"steps[{task.ctx.index}]: {task.spec.method} cannot write {task.outputs} "
                                         f"from a {task.model.format} model")


@method("static_int8")
class StaticInt8(_GraphMethod):
    pass


@method("dynamic_int8")
class DynamicInt8(_GraphMethod):
    def without_graph(self, task: QuantTask) -> list[str]:
        return _eager_dynamic(task)


class _WeightOnly(Method):
    def quantize(self, task: QuantTask) -> list[str]:
        spec, model = task.spec, task.model
        if model.format != "package":
            raise EngineError("unsupported", f"{spec.method} (torchao) is written only as a model package")
        bits = self.bits
        modules = eager.weight_only(model.handle, [eager.module_of(r.name) for r in task.targets], bits,
                                    spec.group_size)
        model.extra["quantized"] = {"method": spec.method, "modules": modules, "per_channel": True}
        group = spec.group_size or (128 if bits == 4 else None)
        task.notes.append(f"torchao weight-only int{bits}" + (f" in groups of {group}" if group else
                                                               " per output channel")
                          + ": Linear layers only" + (f" whose input size is a multiple of {group}" if group else "")
                          + "; a memory and storage saving, not a CPU speed-up (bench/RESULTS.md: slower than fp32 "
                            "on CPU)")
        if bits == 4:
            task.notes.append("int4 values are stored packed two per byte in the package; in memory torchao holds "
                              "them as int8 (IntxWeightOnlyConfig), since its packed int4 CPU kernels are not "
                              "available here")
        return [f"{m}.weight" for m in modules]


@method("weight_int8")
class WeightInt8(_WeightOnly):
    bits = 8


@method("weight_int4")
class WeightInt4(_WeightOnly):
    bits = 4


@method("binary")
class Binary(Method):
    """sign(w) * scale written into every selected weight: a storage format (see the package docstring)."""

    bits = 1

    def quantize(self, task: QuantTask) -> list[str]:
        done = []
        for i, ref in enumerate(task.targets):
            eager.binarize(ref)
            done.append(ref.name)
            task.ctx.progress(0.1 + 0.9 * (i + 1) / len(task.targets), f"binarized {ref.name}")
        task.notes.append("binary is a storage format: the safetensors output packs each weight to 1 sign bit plus "
                          "one float16 scale per output channel; the model runs (and is measured) with the decoded "
                          "float weights, so it is no faster")
        if "safetensors" not in task.outputs:
            task.notes.append("no safetensors output was asked for: the written files hold the decoded float "
                              "weights and are no smaller")
        after = {r.name: r for r in get_format(task.model.format).eligible_weights(task.model)}
        if sum(int((task.before[n] != after[n].read()).any()) for n in done if n in after) == 0:
            raise EngineError("no_effect", f"steps[{task.ctx.index}]: every selected weight was already binary")
        return done


def _onnx_now(task: QuantTask, kernel: dict | None) -> list[str]:
    """An ONNX model's graph quantized at once by ONNX Runtime (the handle is replaced)."""
    from worker.engine.passes.quantize import onnx_nodes, ort

    spec, model, ctx = task.spec, task.model, task.ctx
    proto = model.handle
    onnx_nodes.name_nodes(proto)
    layers = [r.name for r in task.eligible]
    exclude, quantized, _ = onnx_nodes.exclusions(proto, set(task.kept), layers, "norm" in spec.kept_kinds)
    if spec.method == "static_int8":
        first_nodes = onnx_nodes.layer_nodes(proto, task.first_by_default, layers)
        result, more, first_quantized = ort.quantize_static(
            proto, task.calibration, calibration=spec.calibration, per_channel=spec.per_channel, exclude=exclude,
            workdir=ctx.workdir, keep_norm="norm" in spec.kept_kinds, first_layers=first_nodes,
            timing=ctx.timing, kernel=kernel)
        for layer in first_quantized:
            task.kept.pop(layer, None)
            quantized.append(layer)
    else:
        result, more = ort.quantize_dynamic(proto, per_channel=spec.per_channel, exclude=exclude,
                                            workdir=ctx.workdir, keep_norm="norm" in spec.kept_kinds, kernel=kernel)
    task.notes += more
    int8 = ort.int8_weights(result)
    if not int8:
        raise EngineError("no_effect", f"steps[{ctx.index}]: onnxruntime {spec.method} left no int8 weight")
    model.handle = result
    done = sorted({onnx_nodes.layer_of(n, layers) for n in int8} - {None})
    # A weight that only reaches its layer through a constant-folded copy has another name: count it by layer.
    task.extra["int8_initializers"] = len(int8)
    return done or quantized


def _eager_dynamic(task: QuantTask) -> list[str]:
    model, spec = task.model, task.spec
    if model.format != "package":
        raise EngineError("unsupported", "eager dynamic int8 is written only as a model package; ask for onnx")
    modules = eager.dynamic_int8(model.handle, [eager.module_of(r.name) for r in task.targets], spec.per_channel)
    model.extra["quantized"] = {"method": "dynamic_int8", "modules": modules, "per_channel": spec.per_channel}
    task.notes.append("package: Linear layers replaced by torch's dynamic int8 Linear (weights stored as int8 with "
                      "quantization.json; convolutions are not dynamically quantized)")
    return [f"{m}.weight" for m in modules]
