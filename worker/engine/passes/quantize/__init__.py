"""The `quantize` step.

Two kinds of method, because int8 speed lives in different places:

- Graph methods (`static_int8`; `dynamic_int8` for ONNX output). The fast int8 kernels belong to a runtime's graph
  (ONNX Runtime QDQ, inductor on a PT2E program), so the quantized model only exists as the written artifact. On
  an ONNX model the pass quantizes the graph at once (the handle is replaced). On a torch model (pt2, package,
  Hugging Face) it checks what it can (layers selected, calibration data arranged) and records a `QuantPlan` on
  `model.extra["quantize"]`; the sandbox writes each output through `export_output`, which for ONNX exports the
  float model and quantizes that with ONNX Runtime (the path measured fast, FACTS.md), and for .pt2 runs PT2E
  with the X86 inductor quantizer, and proves the file holds int8 weights. The in-memory model stays float.
- Eager methods change the module in place: `dynamic_int8` with package output (torch's dynamic int8 Linear),
  `weight_int8`/`weight_int4` (torchao), recorded in `model.extra["quantized"]` so the package is written with
  integer weights and a quantization.json its loader honours; `binary` writes sign(w) * scale into every selected
  weight (a storage format: the compact safetensors output packs it to 1 bit per weight, and the model runs with
  the decoded float weights).

The job's outputs reach the pass as `model.extra["outputs"]` (set by the sandbox). Layers kept float: the
`keep_float` kinds (first: takes the model input; last: produces the output; norm: normalization ops), and
whatever `targets`/`ignore` leave out; the report lists each with its reason. A first layer kept float only by
static_int8's default is timed in int8 too when the output is ONNX, and quantized there where that is faster
(ort.quantize_static; `amend_step_report` brings the step report in line once the output is written).
Where ONNX Runtime quantizes, the step report's `int8_kernel` (and a note) records the CPU features seen and the
weight range chosen for them: 7 bits on an x86 CPU without VNNI, whose int8 kernels saturate with 8 (ort.int8_kernel).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.recipes import QuantizeSpec
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, ModelFormat, WeightRef, get_format
from worker.engine.passes.base import Pass, StepContext, StepReport, register
from worker.engine.passes.channel import data_source, dataset_arrays
from worker.engine.passes.prune import select
from worker.engine.passes.quantize import eager

PLAN = "quantize"
GRAPH_TARGETS = {"static_int8": ("onnx", "pt2"), "dynamic_int8": ("onnx",)}
BITS = {"static_int8": 8, "dynamic_int8": 8, "weight_int8": 8, "weight_int4": 4, "binary": 1}


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
    int8_kernel: dict | None = None  # ort.int8_kernel, chosen by the step for the ONNX output (None: the host's)


def _sparsity(t: torch.Tensor) -> float:
    return round(float((t == 0).sum()) / max(1, t.numel()), 6)


def _model_inputs(model: LoadedModel, arrays: list[np.ndarray] | None) -> list[np.ndarray] | None:
    fmt = get_format(model.format)
    examples = fmt.example_inputs(model)
    if examples:
        return examples
    return [a[:2] for a in arrays] if arrays else None


def boundary_layers(model: LoadedModel, refs: list[WeightRef], sample: list[np.ndarray] | None
                    ) -> tuple[set[str], set[str]]:
    """(first, last): layers that take a model input, and layers whose output is a model output (else the last
    one run)."""
    names = [r.name for r in refs]
    if not names:
        return set(), set()
    if model.format in ("package", "hf") and sample is not None:
        return _eager_boundaries(model.handle, names, sample)
    if model.format == "onnx":
        from worker.engine.passes.quantize.ort import node_layer, weight_nodes

        graph = model.handle.graph
        inputs = {i.name for i in graph.input}
        outputs = {o.name for o in graph.output}
        first, last = set(), set()
        for node, init in weight_nodes(model.handle):
            layer = node_layer(node, init, names)
            if layer is None:
                continue
            if any(i in inputs for i in node.input if i != init):
                first.add(layer)
            if any(o in outputs for o in node.output):
                last.add(layer)
        return first, last or {names[-1]}
    if model.format == "pt2":
        return _graph_boundaries(model.handle, names)
    return {names[0]}, {names[-1]}


def _graph_boundaries(ep: torch.export.ExportedProgram, names: list[str]) -> tuple[set[str], set[str]]:
    from torch.export.graph_signature import InputKind

    params = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    output = next(n for n in ep.graph.nodes if n.op == "output")
    outs = {n.name for n in output.all_input_nodes}
    first, last = set(), set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        weights = [params[a.name] for a in node.all_input_nodes if a.name in params and params[a.name] in names]
        if not weights:
            continue
        if any(a.name in user for a in node.all_input_nodes):
            first.update(weights)
        if node.name in outs:
            last.update(weights)
    return first, last or {names[-1]}


def _eager_boundaries(net: torch.nn.Module, names: list[str], sample: list[np.ndarray]) -> tuple[set[str], set[str]]:
    modules = {eager.module_of(n): n for n in names}
    args = [torch.from_numpy(np.ascontiguousarray(a[:2])) for a in sample]
    called: list[tuple[str, Any, Any]] = []
    hooks = []
    for mod_name, mod in net.named_modules():
        if mod_name in modules:
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=mod_name: called.append((name, inp, out))))
    try:
        with torch.no_grad():
            out = net(*args)
    except Exception:  # noqa: BLE001  (boundaries are a default; fall back to definition order)
        return {names[0]}, {names[-1]}
    finally:
        for h in hooks:
            h.remove()
    from worker.engine.formats.base import first_tensor

    try:
        result = first_tensor(out)
    except TypeError:
        result = None
    first = {modules[n] for n, inp, _ in called if any(isinstance(x, torch.Tensor) and any(x is a for a in args)
                                                       for x in inp)}
    last = {modules[n] for n, _, o in called if result is not None and o is result}
    if not last and called:
        last = {modules[called[-1][0]]}
    return first, last


def _calibration(model: LoadedModel, spec: QuantizeSpec, ctx: StepContext, notes: list[str]) -> list[np.ndarray]:
    data, name = data_source(ctx, spec.dataset)
    if data is None:
        raise EngineError("bad_dataset", f"steps[{ctx.index}]: static_int8 calibrates activation ranges on data: give "
                                         "a calibration dataset (or use dynamic_int8, which needs none)")
    if name != spec.dataset:
        notes.append(f"no {spec.dataset!r} dataset: calibrated on the {name!r} dataset"
                     + (" (the data that measures accuracy: the figures may flatter the result)" if name == "eval"
                        else ""))
    arrays = [a[: spec.samples] for a in dataset_arrays(model, data)]
    notes.append(f"calibrated on {arrays[0].shape[0]} samples of the {name!r} dataset ({spec.calibration})")
    return arrays


@register(QuantizeSpec)
class Quantize(Pass):
    """Quantizes the selected layers by `spec.method` (see the module docstring)."""

    def apply(self, model: LoadedModel, spec: QuantizeSpec, ctx: StepContext) -> StepReport:
        if model.extra.get(PLAN) is not None or model.extra.get("quantized"):
            raise EngineError("unsupported", f"steps[{ctx.index}]: the model is already quantized")
        fmt = get_format(model.format)
        notes: list[str] = []
        eligible = fmt.eligible_weights(model)
        selected = select(eligible, spec)
        kept: dict[str, str] = {r.name: "not selected by targets/ignore" for r in eligible if r not in selected}
        calibration = _calibration(model, spec, ctx, notes) if spec.method == "static_int8" else None
        sample = _model_inputs(model, calibration)
        if sample is None and model.format in ("package", "hf"):
            data, _ = data_source(ctx, "calibration")
            sample = dataset_arrays(model, data) if data is not None else None
        first, last = boundary_layers(model, eligible, sample)
        kinds = spec.kept_kinds
        outputs = list(model.extra.get("outputs") or [model.format])
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
        ctx.progress(0.1, f"{spec.method}: {len(targets)} layer(s)")
        method = spec.method
        before = {r.name: r.read().clone() for r in eligible}
        extra: dict[str, Any] = {}
        kernel = None
        if method in GRAPH_TARGETS and (model.format == "onnx" or "onnx" in outputs):
            # ONNX Runtime quantizes: weights of the range this CPU's int8 kernels compute exactly.
            from worker.engine.passes.quantize.ort import host_int8_kernel, int8_kernel_note

            kernel = host_int8_kernel()
            notes.append(int8_kernel_note(kernel))
        if method in GRAPH_TARGETS and model.format == "onnx":
            extra = self._onnx_now(model, spec, ctx, eligible, kept, first_by_default, calibration, notes, kernel)
            done = extra.pop("quantized")
        elif method in GRAPH_TARGETS and any(o in GRAPH_TARGETS[method] for o in outputs):
            eager_too = method == "dynamic_int8" and "package" in outputs
            plan = QuantPlan(spec=spec, source=copy.deepcopy(model.handle) if eager_too else model.handle,
                             layers=[r.name for r in eligible], quantized=[r.name for r in targets], kept=kept,
                             calibration=calibration, first_by_default=first_by_default, timing=ctx.timing,
                             int8_kernel=kernel)
            model.extra[PLAN] = plan
            done = [r.name for r in targets]
            written = [o for o in outputs if o in GRAPH_TARGETS[method]]
            notes.append(f"{method} is applied when writing {written}: the exported float graph is quantized "
                         + ("by ONNX Runtime" if written == ["onnx"] else "(ONNX: ONNX Runtime; pt2: PT2E, X86 "
                                                                          "inductor quantizer)"))
            if eager_too:
                done = self._eager_dynamic(model, spec, targets, notes)
        elif method == "dynamic_int8":
            done = self._eager_dynamic(model, spec, targets, notes)
        elif method in ("weight_int8", "weight_int4"):
            done = self._torchao(model, spec, targets, ctx, notes)
        elif method == "binary":
            done = []
            for i, ref in enumerate(targets):
                eager.binarize(ref)
                done.append(ref.name)
                ctx.progress(0.1 + 0.9 * (i + 1) / len(targets), f"binarized {ref.name}")
            notes.append("binary is a storage format: the safetensors output packs each weight to 1 sign bit plus "
                         "one float16 scale per output channel; the model runs (and is measured) with the decoded "
                         "float weights, so it is no faster")
            if "safetensors" not in outputs:
                notes.append("no safetensors output was asked for: the written files hold the decoded float weights "
                             "and are no smaller")
        else:
            raise EngineError("unsupported", f"steps[{ctx.index}]: {method} cannot write {outputs} from a "
                                             f"{model.format} model")
        if not done:
            raise EngineError("no_effect", f"steps[{ctx.index}]: {method} quantized no layer of "
                                           f"{[r.name for r in targets]}")
        for name in [r.name for r in targets if r.name not in done]:
            kept.setdefault(name, f"{method} does not apply to this layer type or shape")
        after = {r.name: r for r in fmt.eligible_weights(model)}
        layers = []
        for r in eligible:
            now = after[r.name].read() if r.name in after else before[r.name]
            layers.append({"name": r.name, "shape": list(r.shape), "sparsity_before": _sparsity(before[r.name]),
                           "sparsity_after": _sparsity(now), "bits": BITS[method] if r.name in done else 32,
                           "quantized": r.name in done, **({"kept_float": kept[r.name]} if r.name in kept else {})})
        if kernel is not None:
            extra["int8_kernel"] = kernel
        if method == "binary":
            changed = sum(int((before[n] != after[n].read()).any()) for n in done if n in after)
            if changed == 0:
                raise EngineError("no_effect", f"steps[{ctx.index}]: every selected weight was already binary")
        return {"type": "quantize", "method": method, "layers": layers, "quantized_layers": len(done),
                "kept_float": [{"name": n, "reason": why} for n, why in kept.items()],
                "calibration": None if calibration is None else
                {"method": spec.calibration, "samples": int(calibration[0].shape[0])},
                "per_channel": spec.per_channel, "group_size": spec.group_size, **extra, "notes": notes}

    def _onnx_now(self, model: LoadedModel, spec: QuantizeSpec, ctx: StepContext, eligible: list[WeightRef],
                  kept: dict[str, str], first_by_default: list[str], calibration, notes: list[str],
                  kernel: dict | None) -> dict[str, Any]:
        from worker.engine.passes.quantize import ort

        proto = model.handle
        ort.name_nodes(proto)
        layers = [r.name for r in eligible]
        exclude, quantized, _ = ort.exclusions(proto, set(kept), layers, "norm" in spec.kept_kinds)
        if spec.method == "static_int8":
            first_nodes = ort.layer_nodes(proto, first_by_default, layers)
            result, more, first_quantized = ort.quantize_static(
                proto, calibration, calibration=spec.calibration, per_channel=spec.per_channel, exclude=exclude,
                workdir=ctx.workdir, keep_norm="norm" in spec.kept_kinds, first_layers=first_nodes,
                timing=ctx.timing, kernel=kernel)
            for layer in first_quantized:
                kept.pop(layer, None)
                quantized.append(layer)
        else:
            result, more = ort.quantize_dynamic(proto, per_channel=spec.per_channel, exclude=exclude,
                                                workdir=ctx.workdir, keep_norm="norm" in spec.kept_kinds,
                                                kernel=kernel)
        notes += more
        int8 = ort.int8_weights(result)
        if not int8:
            raise EngineError("no_effect", f"steps[{ctx.index}]: onnxruntime {spec.method} left no int8 weight")
        model.handle = result
        done = sorted({ort.layer_of(n, [r.name for r in eligible]) for n in int8} - {None})
        # A weight that only reaches its layer through a constant-folded copy has another name: count it by layer.
        return {"quantized": done or quantized, "int8_initializers": len(int8)}

    def _eager_dynamic(self, model: LoadedModel, spec: QuantizeSpec, targets: list[WeightRef],
                       notes: list[str]) -> list[str]:
        if model.format != "package":
            raise EngineError("unsupported", "eager dynamic int8 is written only as a model package; ask for onnx")
        modules = eager.dynamic_int8(model.handle, [eager.module_of(r.name) for r in targets], spec.per_channel)
        model.extra["quantized"] = {"method": "dynamic_int8", "modules": modules, "per_channel": spec.per_channel}
        notes.append("package: Linear layers replaced by torch's dynamic int8 Linear (weights stored as int8 with "
                     "quantization.json; convolutions are not dynamically quantized)")
        return [f"{m}.weight" for m in modules]

    def _torchao(self, model: LoadedModel, spec: QuantizeSpec, targets: list[WeightRef], ctx: StepContext,
                 notes: list[str]) -> list[str]:
        if model.format != "package":
            raise EngineError("unsupported", f"{spec.method} (torchao) is written only as a model package")
        bits = 8 if spec.method == "weight_int8" else 4
        modules = eager.weight_only(model.handle, [eager.module_of(r.name) for r in targets], bits, spec.group_size)
        model.extra["quantized"] = {"method": spec.method, "modules": modules, "per_channel": True}
        group = spec.group_size or (128 if bits == 4 else None)
        notes.append(f"torchao weight-only int{bits}" + (f" in groups of {group}" if group else " per output channel")
                     + ": Linear layers only" + (f" whose input size is a multiple of {group}" if group else "")
                     + "; a memory and storage saving, not a CPU speed-up (FACTS.md: slower than fp32 on CPU)")
        if bits == 4:
            notes.append("int4 values are stored packed two per byte in the package; in memory torchao holds them "
                         "as int8 (IntxWeightOnlyConfig), since its packed int4 CPU kernels are not available here")
        return [f"{m}.weight" for m in modules]


def export_output(fmt: ModelFormat, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None,
                  workdir: Path) -> list[str]:
    """Write `model` as `target`: through its quantization plan when it has one for this target, else plainly."""
    plan: QuantPlan | None = model.extra.get(PLAN)
    if plan is None or target not in GRAPH_TARGETS[plan.spec.method]:
        return fmt.export(model, target, path, examples)
    float_model = LoadedModel(format=model.format, path=model.path, handle=plan.source,
                              extra={k: v for k, v in model.extra.items() if k not in (PLAN, "quantized")})
    if target == "onnx":
        return _export_onnx(fmt, float_model, plan, path, examples, workdir)
    return _export_pt2(fmt, float_model, plan, path, examples)


def amend_step_report(model: LoadedModel, step_reports: list[dict], written: list[str]) -> None:
    """Once the outputs are written: first layers that the ONNX output quantized after all (measured faster, see
    ort.quantize_static) are int8 in the quantize step's report too, which was made before they were written."""
    plan: QuantPlan | None = model.extra.get(PLAN)
    layers = set(plan.onnx_first_quantized) if plan is not None else set()
    report = next((r for r in step_reports if r.get("type") == "quantize"), None)
    if not layers or report is None:
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

    from worker.engine.passes.quantize import ort

    tmp = workdir / "quantize-export.onnx"
    notes = fmt.export(float_model, "onnx", tmp, examples)
    proto = onnx.load(str(tmp))
    ort.name_nodes(proto)
    spec = plan.spec
    kernel = plan.int8_kernel or ort.host_int8_kernel()
    bits = ", in 7 bits: reduce_range, see the step's int8_kernel" if kernel["reduce_range"] else ""
    exclude, _, unmatched = ort.exclusions(proto, set(plan.kept), plan.layers, "norm" in spec.kept_kinds)
    if unmatched:
        notes.append(f"onnx: {len(unmatched)} weight(s) of the exported graph are not among the step's layers "
                     f"(embeddings, constants) and are quantized as ONNX Runtime sees fit: {unmatched[:10]}")
    if spec.method == "static_int8":
        first_nodes = ort.layer_nodes(proto, plan.first_by_default, plan.layers)
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
