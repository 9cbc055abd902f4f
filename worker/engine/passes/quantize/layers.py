"""Which layers a quantize step keeps float by default: those taking a model input (first) and those producing
the model output (last), found in the graph (ONNX, pt2) or by running the module once (package, Hugging Face)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, WeightRef, first_tensor
from worker.engine.passes.quantize import eager


def sparsity(t: torch.Tensor) -> float:
    return round(float((t == 0).sum()) / max(1, t.numel()), 6)


def model_inputs(model: LoadedModel, arrays: list[np.ndarray] | None) -> list[np.ndarray] | None:
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
        from worker.engine.passes.quantize.onnx_nodes import node_layer, weight_nodes

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
