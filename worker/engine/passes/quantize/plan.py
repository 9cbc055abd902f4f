"""Graph quantization of a torch model, applied when an output is written (see the package docstring): the plan
a quantize step records, and the writing of the ONNX (ONNX Runtime) and .pt2 (PT2E) outputs from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.recipes import QuantizeSpec
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, ModelFormat
from worker.engine.passes.quantize import eager

GRAPH_TARGETS = {"static_int8": ("onnx", "pt2"), "dynamic_int8": ("onnx",)}


@dataclass
class QuantPlan:
    """Graph quantization to apply when an output is written (see the module docstring)."""

    spec: QuantizeSpec
    source: Any  # the float handle to export (ExportedProgram or nn.Module)
    layers: list[str]  # every eligible weight, by name
    quantized: list[str]
    kept: dict[str, str]  # layer -> why it stays float
    calibration: list[np.ndarray] | None = None
    first_by_default: list[str] = field(default_factory=list)  # kept float only by the default: ONNX may quantize
    timing: tuple[int, int] = (1, 32)  # the job's (threads, batch), for that choice
    onnx_first_quantized: list[str] = field(default_factory=list)  # of first_by_default, int8 in the ONNX output
    int8_kernel: dict | None = None  # int8_kernel.int8_kernel: the step's choice for the ONNX output (None: the host's)


def export_planned(plan: QuantPlan, fmt: ModelFormat, model: LoadedModel, target: str, path: Path,
                   examples: list[np.ndarray] | None, workdir: Path) -> list[str] | None:
    """Write `model` as `target` through the plan, or None when the plan does not write that target."""
    if target not in GRAPH_TARGETS[plan.spec.method]:
        return None
    float_model = LoadedModel(format=model.format, path=model.path, handle=plan.source,
                              extra={k: v for k, v in model.extra.items() if k != "quantized"})
    if target == "onnx":
        return _export_onnx(fmt, float_model, plan, path, examples, workdir)
    return _export_pt2(fmt, float_model, plan, path, examples)


def amend_report(plan: QuantPlan, report: dict, written: list[str]) -> None:
    """Once the outputs are written: first layers that the ONNX output quantized after all (measured faster, see
    ort.quantize_static) are int8 in the quantize step's report too, which was made before they were written."""
    layers = set(plan.onnx_first_quantized)
    if not layers:
        return
    for layer in report["layers"]:
        if layer["name"] in layers:
            layer.update(bits=8, quantized=True)
            layer.pop("kept_float", None)
            if "pt2" in written:
                layer["kept_float"] = "in the pt2 output only (first layer); int8 in the ONNX output"
    report["kept_float"] = [k for k in report["kept_float"] if k["name"] not in layers]
    report["quantized_layers"] += len(layers)


def _export_onnx(fmt: ModelFormat, float_model: LoadedModel, plan: QuantPlan, path: Path,
                 examples: list[np.ndarray] | None, workdir: Path) -> list[str]:
    import onnx

    from worker.engine.passes.quantize import onnx_nodes, ort
    from worker.engine.passes.quantize.int8_kernel import host_int8_kernel

    tmp = workdir / "quantize-export.onnx"
    notes = fmt.export(float_model, "onnx", tmp, examples)
    proto = onnx.load(str(tmp))
    onnx_nodes.name_nodes(proto)
    spec = plan.spec
    kernel = plan.int8_kernel or host_int8_kernel()
    bits = ", in 7 bits: reduce_range, see the step's int8_kernel" if kernel["reduce_range"] else ""
    exclude, _, unmatched = onnx_nodes.exclusions(proto, set(plan.kept), plan.layers, "norm" in spec.kept_kinds)
    if unmatched:
        notes.append(f"onnx: {len(unmatched)} weight(s) of the exported graph are not among the step's layers "
                     f"(embeddings, constants) and are quantized as ONNX Runtime sees fit: {unmatched[:10]}")
    if spec.method == "static_int8":
        first_nodes = onnx_nodes.layer_nodes(proto, plan.first_by_default, plan.layers)
        result, more, first_quantized = ort.quantize_static(
            proto, plan.calibration, calibration=spec.calibration, per_channel=spec.per_channel, exclude=exclude,
            workdir=workdir, keep_norm="norm" in spec.kept_kinds, first_layers=first_nodes, timing=plan.timing,
            kernel=kernel)
        plan.onnx_first_quantized = first_quantized
        notes += more + ["onnx: static int8 by ONNX Runtime (QDQ, uint8 activations, int8 "
                         f"{'per-channel' if spec.per_channel else 'per-tensor'} weights{bits})"]
    else:
        result, more = ort.quantize_dynamic(proto, per_channel=spec.per_channel, exclude=exclude, workdir=workdir,
                                            keep_norm="norm" in spec.kept_kinds, kernel=kernel)
        notes += more + [f"onnx: dynamic int8 by ONNX Runtime (int8 weights{bits}; activations quantized per "
                         "batch)"]
    int8 = ort.int8_weights(result)
    if not int8:
        raise EngineError("no_effect", f"{spec.method}: the ONNX output has no int8 weight")
    onnx.save(result, str(path))
    return notes


def _capture(fmt: ModelFormat, model: LoadedModel, examples: list[np.ndarray] | None
             ) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], bool, str]:
    """A torch.export graph module of the float model (batch dim dynamic when possible), its example args and the
    prefix its module names carry."""
    from worker.engine.formats import _torch

    if model.format == "pt2":
        ep = model.handle
        ex = ep.example_inputs
        args = tuple(ex[0]) if ex and ex[0] else _torch.to_tensors(_torch.batch_of(examples))
        return ep.module(), args, fmt.fixed_batch(model) is None, ""
    examples = fmt.example_inputs(model) or examples
    if examples is None:
        raise EngineError("bad_dataset", "writing a quantized .pt2 needs example inputs: give an eval dataset")
    net, prefix = model.handle, ""
    if model.format == "hf":
        from worker.engine.formats.hf import _Logits

        net, prefix = _Logits(model.handle).eval(), "hf."
        examples = [np.ascontiguousarray(examples[0]).astype(np.int64)]
    args = _torch.to_tensors(_torch.batch_of(examples))
    try:
        ep = torch.export.export(net, args, dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in args))
        return ep.module(), args, True, prefix
    except Exception:  # noqa: BLE001  (fixed batch fallback, as the package format does)
        return torch.export.export(net, args).module(), args, False, prefix


def _export_pt2(fmt: ModelFormat, float_model: LoadedModel, plan: QuantPlan, path: Path,
                examples: list[np.ndarray] | None) -> list[str]:
    from worker.engine.passes.quantize import pt2e

    gm, args, dynamic, prefix = _capture(fmt, float_model, examples)
    float_modules = [prefix + eager.module_of(n) for n in plan.kept]
    ep, facts = pt2e.quantize(gm, args, dynamic, plan.calibration, calibration=plan.spec.calibration,
                              per_channel=plan.spec.per_channel, float_modules=float_modules)
    if not facts["int8_weights"]:
        raise EngineError("no_effect", "static_int8: PT2E quantized no weight")
    torch.export.save(ep, str(path))
    return [f"pt2: static int8 by PT2E (X86 inductor quantizer, {plan.spec.calibration} calibration): "
            f"{len(facts['int8_weights'])} int8 weight(s), {len(facts['removed_fp32'])} unused fp32 tensor(s) removed; "
            "the int8 kernels run under torch.compile (the torch-compile runtime); eagerly it is slower than fp32"]
