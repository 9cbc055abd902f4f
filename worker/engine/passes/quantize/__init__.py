"""The `quantize` step.

Two kinds of method, because int8 speed lives in different places:

- Graph methods (`static_int8`; `dynamic_int8` for ONNX output). The fast int8 kernels belong to a runtime's graph
  (ONNX Runtime QDQ, inductor on a PT2E program), so the quantized model only exists as the written artifact. On
  an ONNX model the pass quantizes the graph at once (the handle is replaced). On a torch model (pt2, package,
  Hugging Face) it checks what it can (layers selected, calibration data arranged) and keeps a `QuantPlan`
  (plan.py); the job's export stage writes each output through the pass's `export`, which for ONNX exports the
  float model and quantizes that with ONNX Runtime (the path measured fast, bench/RESULTS.md), and for .pt2 runs PT2E
  with the X86 inductor quantizer, and proves the file holds int8 weights. The in-memory model stays float.
- Eager methods change the module in place: `dynamic_int8` with package output (torch's dynamic int8 Linear),
  `weight_int8`/`weight_int4` (torchao), recorded in `model.extra["quantized"]` so the package is written with
  integer weights and a quantization.json its loader honours; `binary` writes sign(w) * scale into every selected
  weight (a storage format: the compact safetensors output packs it to 1 bit per weight, and the model runs with
  the decoded float weights).

Each method is a registered handler (methods.py). The job's outputs reach the pass as `ctx.outputs`. Layers kept
float: the
`keep_float` kinds (first: takes the model input; last: produces the output; norm: normalization ops), and
whatever `targets`/`ignore` leave out; the report lists each with its reason. A first layer kept float only by
static_int8's default is timed in int8 too when the output is ONNX, and quantized there where that is faster
(ort.quantize_static; the pass's `finalize` brings the step report in line once the output is written).
Where ONNX Runtime quantizes, the step report's `int8_kernel` (and a note) records the CPU features seen and the
weight range chosen for them: 7 bits on an x86 CPU without VNNI, whose int8 kernels saturate with 8 (int8_kernel.int8_kernel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.recipes import QuantizeSpec
from app.recipes.steps import LLM_METHODS
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel
from worker.engine.formats.hf import is_causal_lm
from worker.engine.llm.steps import apply_llm_step
from worker.engine.passes.base import Pass, StepContext, StepReport, register
from worker.engine.passes.quantize.layers import boundary_layers, model_inputs, sparsity
from worker.engine.passes.quantize.methods import METHODS, QuantTask, handler_for
from worker.engine.passes.quantize.plan import QuantPlan, amend_report, export_planned
from worker.engine.shared.data import data_source, dataset_arrays, fallback_note
from worker.engine.shared.selection import select

__all__ = ["METHODS", "Quantize"]
# Methods a causal LM is quantized by through llm-compressor (worker/engine/llm/steps.py); static_int8,
# dynamic_int8 and binary keep their own handlers.
LLM_CAPABLE = ("weight_int4", "weight_int8", *LLM_METHODS)


def _calibration(model: LoadedModel, spec: QuantizeSpec, ctx: StepContext, notes: list[str]
                 ) -> tuple[list[np.ndarray], str]:
    """(calibration arrays, the name of the dataset they come from)."""
    data, name = data_source(ctx.datasets, spec.dataset)
    if data is None:
        raise EngineError("bad_dataset", f"steps[{ctx.index}]: static_int8 calibrates activation ranges on data: give "
                                         "a calibration dataset (or use dynamic_int8, which needs none)")
    notes += filter(None, [fallback_note(spec.dataset, name, "the data that measures accuracy")])
    arrays = [a[: spec.calibration_samples] for a in dataset_arrays(model, data)]
    notes.append(f"calibrated on {arrays[0].shape[0]} samples of the {name!r} dataset ({spec.calibration})")
    return arrays, name


@register(QuantizeSpec)
class Quantize(Pass):
    """Quantizes the selected layers by `spec.method` (see the module docstring)."""

    plan: QuantPlan | None = None  # graph quantization this step applies when an output is written

    def apply(self, model: LoadedModel, spec: QuantizeSpec, ctx: StepContext) -> StepReport:
        if model.extra.get("quantized") or any(isinstance(p, Quantize) and p.plan is not None for p in ctx.earlier):
            raise EngineError("unsupported", f"steps[{ctx.index}]: the model is already quantized")
        if is_causal_lm(model) and spec.method in LLM_CAPABLE:
            return apply_llm_step(model, spec, ctx)
        if spec.method in LLM_METHODS or spec.algorithm not in (None, "rtn"):
            raise EngineError("unsupported", f"steps[{ctx.index}]: {spec.algorithm or spec.method} is for Hugging "
                                             "Face causal LMs (llm-compressor); this model is not one")
        task = _task(model, spec, ctx)
        ctx.progress(0.1, f"{spec.method}: {len(task.targets)} layer(s)")
        done = handler_for(spec.method).quantize(task)
        self.plan = task.plan
        if not done:
            raise EngineError("no_effect", f"steps[{ctx.index}]: {spec.method} quantized no layer of "
                                           f"{[r.name for r in task.targets]}")
        return _report(task, done)

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None,
               workdir: Path) -> list[str] | None:
        if self.plan is None:
            return None
        return export_planned(self.plan, get_format(model.format), model, target, path, examples, workdir)

    def finalize(self, report: StepReport, written: list[str]) -> None:
        if self.plan is not None:
            amend_report(self.plan, report, written)


def _task(model: LoadedModel, spec: QuantizeSpec, ctx: StepContext) -> QuantTask:
    """The layers to quantize, those kept float (and why), calibration data, as the method handler gets them."""
    notes: list[str] = []
    eligible = get_format(model.format).eligible_weights(model)
    selected = select(eligible, spec, ctx.index)
    kept: dict[str, str] = {r.name: "not selected by targets/ignore" for r in eligible if r not in selected}
    calibration, calibration_dataset = _calibration(model, spec, ctx, notes) if spec.method == "static_int8" \
        else (None, None)
    sample = model_inputs(model, calibration)
    if sample is None and model.format in ("package", "hf"):
        data, _ = data_source(ctx.datasets, "calibration")
        sample = dataset_arrays(model, data) if data is not None else None
    first, last = boundary_layers(model, eligible, sample)
    kinds = spec.kept_kinds
    outputs = list(ctx.outputs or [model.format])
    # static_int8's default for the first layer is a guess (few input channels: slow in int8); ONNX output
    # measures it (ort.quantize_static) and quantizes the layer where that is faster.
    may_quantize_first = spec.keep_float is None and spec.method == "static_int8" and \
        (model.format == "onnx" or "onnx" in outputs)
    first_by_default = []
    for r in selected:
        if "first" in kinds and r.name in first:
            if may_quantize_first:
                kept[r.name] = ("first layer (takes the model input): kept float by default, except in ONNX "
                                "output where int8 measured faster (see the notes)")
                first_by_default.append(r.name)
            else:
                kept[r.name] = "first layer (takes the model input): kept float by keep_float"
        elif "last" in kinds and r.name in last:
            kept[r.name] = "last layer (produces the output): kept float by keep_float"
    targets = [r for r in selected if r.name not in kept]
    if not targets:
        raise EngineError("no_effect", f"steps[{ctx.index}]: no layer left to quantize: eligible "
                                       f"{[r.name for r in eligible][:50]}, kept float {kept}; set keep_float or "
                                       "targets/ignore")
    if "norm" in kinds:
        notes.append("normalization layers stay float (keep_float: norm)")
    return QuantTask(model=model, spec=spec, ctx=ctx, outputs=outputs, eligible=eligible, targets=targets, kept=kept,
                     first_by_default=first_by_default, calibration=calibration,
                     before={r.name: r.read().clone() for r in eligible}, notes=notes,
                     extra={"calibration_dataset": calibration_dataset} if calibration_dataset else {})


def _report(task: QuantTask, done: list[str]) -> StepReport:
    spec, kept, model = task.spec, task.kept, task.model
    for name in [r.name for r in task.targets if r.name not in done]:
        kept.setdefault(name, f"{spec.method} does not apply to this layer type or shape")
    after = {r.name: r for r in get_format(model.format).eligible_weights(model)}
    bits = METHODS[spec.method].bits
    layers = []
    for r in task.eligible:
        now = after[r.name].read() if r.name in after else task.before[r.name]
        layers.append({"name": r.name, "shape": list(r.shape), "sparsity_before": sparsity(task.before[r.name]),
                       "sparsity_after": sparsity(now), "bits": bits if r.name in done else 32,
                       "quantized": r.name in done, **({"kept_float": kept[r.name]} if r.name in kept else {})})
    calibration = task.calibration
    return {"type": "quantize", "method": spec.method, "layers": layers, "quantized_layers": len(done),
            "kept_float": [{"name": n, "reason": why} for n, why in kept.items()],
            "calibration": None if calibration is None else
            {"method": spec.calibration, "samples": int(calibration[0].shape[0])},
            "per_channel": spec.per_channel, "group_size": spec.group_size, **task.extra, "notes": task.notes}
