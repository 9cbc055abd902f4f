"""Recipe steps on a causal LM through llm-compressor (llmc.py): `quantize` weight_int4/weight_int8 with
algorithm rtn | gptq | awq, w8a8 (SmoothQuant + GPTQ) and fp8; `prune` sparsegpt | wanda. The prune and quantize
passes call `apply_llm_step`; it turns the spec into an LlmcStep, picks the calibration windows, applies it in
place and writes the step report (per layer: shape, sparsity before/after, bits)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from app.recipes import PruneSpec, QuantizeSpec
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel
from worker.engine.llm.sensitivity import decoder_layer, layer_sensitivity, mixed_plan
from worker.engine.passes.base import StepContext, StepReport
from worker.engine.shared.data import data_source, fallback_note
from worker.engine.shared.selection import select

CALIBRATING = ("gptq", "awq", "w8a8", "sparsegpt", "wanda")
GROUPS = (128, 64, 32)
SENSITIVITY_WINDOWS = 8  # calibration windows each layer's perplexity is measured on  # the default group size: the largest that divides every target layer's input width


def llmc_step(spec: PruneSpec | QuantizeSpec, modules: list[str], widths: list[int], notes: list[str]):
    """The LlmcStep for a recipe step, targeting exactly `modules` (their input widths: `widths`)."""
    from worker.engine.llm.llmc import LlmcStep

    targets = [f"re:^{re.escape(m)}$" for m in modules]
    if isinstance(spec, PruneSpec):
        return LlmcStep(kind=spec.method, sparsity=spec.sparsity,
                        mask_structure="0:0" if spec.pattern == "unstructured" else spec.pattern,
                        targets=targets, ignore=[])
    if spec.method in ("w8a8", "fp8"):
        return LlmcStep(kind=spec.method, bits=8, group_size=None, smoothing_strength=spec.smoothing_strength,
                        targets=targets, ignore=[])
    bits = 4 if spec.method == "weight_int4" else 8
    group = spec.group_size if spec.group_size is not None or bits == 8 else _default_group(widths, notes)
    return LlmcStep(kind=spec.algorithm or "rtn", bits=bits, group_size=group, symmetric=spec.symmetric,
                    act_order=spec.act_order, targets=targets, ignore=[])


def _default_group(widths: list[int], notes: list[str]) -> int:
    for group in GROUPS:
        if all(w % group == 0 for w in widths):
            if group != GROUPS[0]:
                notes.append(f"group_size {group}: the largest of {list(GROUPS)} that divides every quantized "
                             f"layer's input width ({sorted(set(widths))[:6]})")
            return group
    raise EngineError("unsupported", f"no group size of {list(GROUPS)} divides every layer's input width "
                                     f"({sorted(set(widths))[:6]}): set group_size, or ignore the odd layers")


def _calibration(spec, ctx: StepContext, kind: str, notes: list[str]) -> np.ndarray | None:
    if kind not in CALIBRATING:
        return None
    data, name = data_source(ctx.datasets, spec.dataset)
    if data is None:
        raise EngineError("bad_dataset", f"steps[{ctx.index}]: {kind} calibrates on text: give a calibration "
                                         "dataset (.txt, .jsonl or .parquet; rtn needs none)")
    notes += filter(None, [fallback_note(spec.dataset, name, "the text perplexity is measured on")])
    windows = next(iter(data.inputs.values()))
    samples = spec.calibration_samples if isinstance(spec, QuantizeSpec) else spec.samples
    return np.ascontiguousarray(windows[:samples]).astype(np.int64)


def apply_llm_step(model: LoadedModel, spec: PruneSpec | QuantizeSpec, ctx: StepContext) -> StepReport:
    from worker.engine.llm.llmc import apply_llmc

    fmt = get_format(model.format)
    eligible = fmt.eligible_weights(model)
    selected = select(eligible, spec, ctx.index)
    if not selected:
        raise EngineError("no_effect", f"steps[{ctx.index}]: no eligible weight matched targets={spec.targets} "
                                       f"ignore={spec.ignore}")
    before = {r.name: _sparsity(r.read()) for r in eligible}  # the report needs sparsities, not weight copies
    notes: list[str] = []
    modules = [r.name.removesuffix(".weight") for r in selected]
    step = llmc_step(spec, modules, [int(r.shape[-1]) for r in selected], notes)
    calibration = _calibration(spec, ctx, step.kind, notes)
    extra, eight_bit = _sensitivity(model, spec, ctx, step, modules, calibration, notes)
    tokens = None if calibration is None else torch.from_numpy(calibration)
    workdir = ctx.workdir / f"llmc-{ctx.index}"
    if eight_bit:  # mixed precision: the sensitive layers first, at 8 bits per channel, by the same algorithm
        wide = replace(step, bits=8, group_size=None, targets=[f"re:^{re.escape(m)}$" for m in eight_bit])
        apply_llmc(model.handle, wide, tokens, workdir / "8bit", ctx.progress)
        step = replace(step, targets=[t for t, m in zip(step.targets, modules) if m not in eight_bit])
    report = apply_llmc(model.handle, step, tokens, workdir, ctx.progress)
    model.extra["llmc"] = True
    if step.kind in ("rtn", "gptq", "awq"):
        model.extra.setdefault("weight_bits", step.bits)
    out = _report(model, spec, step, report, before, notes, eight_bit)
    return {**out, **extra}


def _sensitivity(model: LoadedModel, spec, ctx: StepContext, step, modules: list[str],
                 calibration: np.ndarray | None, notes: list[str]) -> tuple[dict, list[str]]:
    """({"sensitivity": ..., "mixed": ...} for the report, the modules kept at 8 bits) when the step asks."""
    if not isinstance(spec, QuantizeSpec) or not (spec.sensitivity or spec.bits_budget):
        return {}, []
    if step.kind not in ("rtn", "gptq", "awq"):
        raise EngineError("unsupported", f"steps[{ctx.index}]: sensitivity and bits_budget are for weight "
                                         "quantization (weight_int4 / weight_int8)")
    windows = calibration
    if windows is None:
        data, _ = data_source(ctx.datasets, spec.dataset)
        if data is None:
            raise EngineError("bad_dataset", f"steps[{ctx.index}]: the sensitivity pass measures perplexity: give "
                                             "a calibration dataset")
        windows = next(iter(data.inputs.values()))
    windows = np.ascontiguousarray(windows[:SENSITIVITY_WINDOWS]).astype(np.int64)
    found = layer_sensitivity(model.handle, modules, windows, step.bits, step.group_size,
                              lambda f, m: ctx.progress(0.3 * f, m))
    if not spec.bits_budget:
        return {"sensitivity": found}, []
    kept, bits = mixed_plan(found, step.bits, spec.bits_budget,
                            sum(model.handle.get_submodule(m).weight.numel() for m in modules
                                if decoder_layer(m) is None))
    notes.append(f"mixed precision: {len(kept)} of {len(found['layers'])} decoder layers kept at 8 bits (the most "
                 f"sensitive), {bits} bits per quantized weight on average (budget {spec.bits_budget})")
    eight_bit = [m for m in modules if decoder_layer(m) in kept]
    return {"sensitivity": found, "mixed": {"layers_8bit": kept, "bits_per_weight": bits,
                                            "budget": spec.bits_budget}}, eight_bit


def _report(model: LoadedModel, spec, step, llmc: dict[str, Any], before: dict, notes: list[str],
            eight_bit: list[str]) -> StepReport:
    changed = set(llmc.get("modules") or []) | set(eight_bit)
    pruned = step.kind in ("sparsegpt", "wanda")  # zeros, not fewer bits: their layers stay 32-bit in memory
    layers = []
    for ref in get_format(model.format).eligible_weights(model):
        module = ref.name.removesuffix(".weight")
        now = ref.read()
        layers.append({"name": ref.name, "shape": list(ref.shape),
                       "sparsity_before": before[ref.name], "sparsity_after": _sparsity(now),
                       "bits": (8 if module in eight_bit else step.bits) if module in changed and not pruned else 32,
                       "changed": module in changed})
    if not changed:
        raise EngineError("no_effect", f"{step.kind} changed no layer")
    base = {"type": spec.type, "method": spec.method, "layers": layers, "library": llmc.get("library"),
            "algorithm": step.kind, "scheme": llmc.get("scheme"), "layers_changed": len(changed),
            "calibration": llmc.get("calibration"), "pipeline": llmc.get("pipeline"),
            "peak_rss_mb": llmc.get("peak_rss_mb"), "notes": [*notes, *(llmc.get("notes") or [])]}
    if isinstance(spec, PruneSpec):
        return {**base, "pattern": spec.pattern, "target_sparsity": spec.sparsity}
    return {**base, "group_size": step.group_size, "symmetric": step.symmetric, "act_order": step.act_order}


def _sparsity(t: torch.Tensor) -> float:
    return round(float((t == 0).sum()) / max(1, t.numel()), 6)
