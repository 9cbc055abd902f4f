"""Magnitude pruning: unstructured (global or per layer, exact to the requested fraction) or N:M along the input dim."""

from __future__ import annotations

import torch

from app.recipes import PruneSpec
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, WeightRef
from worker.engine.formats.hf import is_causal_lm
from worker.engine.llm.steps import apply_llm_step
from worker.engine.passes.base import Pass, StepContext, StepReport, register
from worker.engine.shared.selection import selected_weights


def smallest_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly `k` smallest entries of a flat tensor; ties at the threshold broken by position.

    A plain `abs <= threshold` over-prunes when many weights tie (already-zero weights, quantized values).
    """
    return smallest_masks([magnitudes], k)[0]


def smallest_masks(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks of exactly the `k` entries of smallest magnitude over all of `tensors`, as if they were one flat
    tensor; ties at the threshold broken by position in that order.

    The threshold comes from two histogram passes over the float32 bit patterns of |w| (ordered like the values)
    instead of `kthvalue` over a concatenated copy, which for a 2 GiB model held the copy, a sorted copy and int64
    indices at once (4x the weights on top of them, measured): magnitudes are taken one layer at a time, so the
    extra memory is that layer's temporaries and the boolean masks (a quarter of the float32 weights)."""
    total = sum(t.numel() for t in tensors)
    if k <= 0 or k >= total:
        return [torch.full_like(t, k > 0, dtype=torch.bool) for t in tensors]
    threshold = _kth_smallest(tensors, k)
    masks = [t.detach().abs() < threshold for t in tensors]
    need = k - sum(int(m.sum()) for m in masks)
    for values, mask in zip(tensors, masks):
        if need <= 0:
            break
        ties = torch.nonzero((values.detach().abs() == threshold).reshape(-1), as_tuple=True)[0][:need]
        mask.view(-1)[ties] = True
        need -= ties.numel()
    return masks


def _kth_smallest(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th smallest magnitude (1-based) over `tensors`: the high 16 bits of its float32 pattern find its
    bucket, the low 16 bits within that bucket find the value."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().abs().contiguous().reshape(-1).view(torch.int32)

    high = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tensors:
        high += torch.bincount(bits(t) >> 16, minlength=1 << 16)
    below = torch.cumsum(high, 0)
    bucket = int(torch.searchsorted(below, k))  # first bucket whose running count reaches k
    rank = k - (int(below[bucket - 1]) if bucket else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tensors:
        b = bits(t)
        low += torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    value = (bucket << 16) | int(torch.searchsorted(torch.cumsum(low, 0), rank))
    return torch.tensor([value], dtype=torch.int32).view(torch.float32)[0]


def _sparsity(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / max(1, t.numel())


def dtype_bits(t: torch.Tensor) -> int:
    """Bits per stored element of a dense tensor (32 for fp32)."""
    return t.element_size() * 8


# --- N:M -------------------------------------------------------------------------------------------------------

# pt2 ops whose weight argument is laid out [in, out] (reduction dim first), unlike linear/conv's [out, in, ...].
_PT2_IN_FIRST = {"aten.mm.default", "aten.addmm.default", "aten.conv_transpose1d.default",
                 "aten.conv_transpose2d.input", "aten.conv_transpose3d.input"}


def _onnx_attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _onnx_input_axes(model: LoadedModel) -> dict[str, int]:
    """Initializer name -> its reduction (input-feature) dim, from how Conv/Gemm/MatMul consume it.

    Conv weights are [out, in/g, k...] (dim 1), ConvTranspose [in, out/g, k...] (dim 0), Gemm's B is [in, out]
    unless transB, MatMul's B is [..., in, out]; a Transpose in between permutes the dims.
    """
    graph = model.handle.graph
    inits = {i.name: len(i.dims) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    axes: dict[str, int] = {}
    for node in graph.node:
        for pos in {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}.get(node.op_type, ()):
            if pos >= len(node.input):
                continue
            name = node.input[pos]
            perm = None
            producer = producers.get(name)
            if name not in inits and producer is not None and producer.op_type in ("Transpose", "Identity"):
                name = producer.input[0]
                if producer.op_type == "Transpose":
                    perm = _onnx_attr(producer, "perm", None)
            if name not in inits or name in axes:
                continue
            ndim = inits[name]
            if node.op_type == "Conv":
                axis = 1
            elif node.op_type == "ConvTranspose":
                axis = 0
            elif node.op_type == "Gemm":
                axis = (1 - int(_onnx_attr(node, "transA", 0))) if pos == 0 else int(_onnx_attr(node, "transB", 0))
            else:  # MatMul: A is [..., m, in], B is [..., in, n]
                axis = ndim - 1 if pos == 0 else ndim - 2
            if perm is not None or (producer is not None and producer.op_type == "Transpose"):
                perm = list(perm) if perm else list(range(ndim))[::-1]  # Transpose's default reverses the dims
                axis = perm[axis]
            axes[name] = axis
    return axes


def _pt2_input_axes(model: LoadedModel) -> dict[str, int]:
    from torch.export.graph_signature import InputKind

    ep = model.handle
    params = {s.arg.name: s.target for s in ep.graph_signature.input_specs
              if s.kind == InputKind.PARAMETER and s.target is not None}
    axes: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = str(node.target)
        idx = 2 if op == "aten.addmm.default" else 1
        if len(node.args) <= idx:
            continue
        target = params.get(getattr(node.args[idx], "name", None))
        if target is None or target in axes:
            continue
        transposed = op == "aten.convolution.default" and len(node.args) > 6 and bool(node.args[6])
        axes[target] = 0 if op in _PT2_IN_FIRST or transposed else 1
    return axes


def _package_input_axes(model: LoadedModel) -> dict[str, int]:
    conv_t = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    return {f"{name}.weight" if name else "weight": 0
            for name, mod in model.handle.named_modules() if isinstance(mod, conv_t)}


def input_axes(model: LoadedModel) -> dict[str, int]:
    """Weight name -> the dim that holds input features, where it is not dim 1 (the Linear/Conv layout)."""
    if model.format == "onnx":
        return _onnx_input_axes(model)
    if model.format == "pt2":
        return _pt2_input_axes(model)
    if model.format == "package":
        return _package_input_axes(model)
    return {}


def nm_mask(w: torch.Tensor, n: int, m: int, axis: int) -> torch.Tensor:
    """Boolean mask (True = prune) keeping the `n` largest |w| of every `m` consecutive weights along `axis`.

    The input dim is moved innermost first, so groups run along it for each (out, k...) position; ties go to
    the lower position (a stable sort), so the result is deterministic.
    """
    moved = w.detach().abs().float().movedim(axis, -1)
    groups = moved.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return (~keep).reshape(moved.shape).movedim(-1, axis)


def max_nonzeros_per_group(w: torch.Tensor, m: int, axis: int) -> int:
    return int((w.movedim(axis, -1).reshape(-1, m) != 0).sum(dim=1).max()) if w.numel() else 0


def _prune_nm(model: LoadedModel, spec: PruneSpec, ctx: StepContext, eligible: list[WeightRef],
              refs: list[WeightRef]) -> StepReport:
    n, m = (int(v) for v in spec.pattern.split(":"))
    axes = input_axes(model)
    axis_of = {r.name: axes.get(r.name, 1) for r in refs}
    bad = [r for r in refs if r.shape[axis_of[r.name]] % m]
    if bad:
        listed = ", ".join(f"{r.name} {list(r.shape)} (input dim {axis_of[r.name]} = {r.shape[axis_of[r.name]]})"
                           for r in bad[:20])
        raise EngineError("unsupported_pattern", f"steps[{ctx.index}]: pattern {spec.pattern} needs the input dim "
                                                 f"of every pruned weight to be a multiple of {m}; these are not: "
                                                 f"{listed}. Leave them out with e.g. ignore: "
                                                 f"{[r.name for r in bad[:20]]}")
    layers, changed, zeros_before, zeros_after, total = [], 0, 0, 0, 0
    for i, ref in enumerate(refs):
        w = ref.read()
        axis = axis_of[ref.name]
        before = _sparsity(w)
        mask = nm_mask(w, n, m, axis)
        changed += int((mask & (w != 0)).sum())
        ref.write(w.masked_fill(mask, 0))
        stored = ref.read()  # read back: proves the format stored the change
        worst = max_nonzeros_per_group(stored, m, axis)
        if worst > n:
            raise RuntimeError(f"{ref.name}: a group of {m} still has {worst} non-zeros after {spec.pattern} pruning")
        zeros_before += round(before * w.numel())
        zeros_after += int((stored == 0).sum())
        total += w.numel()
        layers.append({"name": ref.name, "shape": list(ref.shape), "sparsity_before": round(before, 6),
                       "sparsity_after": round(_sparsity(stored), 6), "pattern": spec.pattern, "input_dim": axis,
                       "max_nonzeros_per_group": worst, "bits": dtype_bits(stored)})
        ctx.progress((i + 1) / len(refs), f"pruned {ref.name} to {spec.pattern}")
    if changed == 0:
        raise EngineError("no_effect", f"steps[{ctx.index}]: the matched weights already follow {spec.pattern}; "
                                       "pruning changed nothing")
    return {
        "type": "prune", "method": spec.method, "scope": spec.scope, "pattern": spec.pattern,
        "target_sparsity": spec.sparsity, "layers": layers, "weights_pruned": changed, "eligible_params": total,
        "sparsity_before": round(zeros_before / total, 6), "sparsity_after": round(zeros_after / total, 6),
        "skipped": sorted({r.name for r in eligible} - {r.name for r in refs}),
    }


@register(PruneSpec)
class MagnitudePrune(Pass):
    def apply(self, model: LoadedModel, spec: PruneSpec, ctx: StepContext) -> StepReport:
        if spec.method != "magnitude":
            if not is_causal_lm(model):
                raise EngineError("unsupported", f"steps[{ctx.index}]: {spec.method} prunes Hugging Face causal LMs "
                                                 "from calibration text; use method magnitude for this model")
            return apply_llm_step(model, spec, ctx)
        eligible, refs = selected_weights(model, spec, ctx.index)
        if spec.pattern != "unstructured":
            return _prune_nm(model, spec, ctx, eligible, refs)
        weights = [r.read() for r in refs]
        before = [_sparsity(w) for w in weights]
        if spec.scope == "global":
            masks = smallest_masks(weights, round(spec.sparsity * sum(w.numel() for w in weights)))
        else:
            masks = [smallest_mask(w.detach().abs().float().reshape(-1), round(spec.sparsity * w.numel()))
                     for w in weights]
        layers, changed, zeros_after = [], 0, 0
        for i, (ref, w, m) in enumerate(zip(refs, weights, masks)):
            m = m.reshape(w.shape)
            changed += int((m & (w != 0)).sum())
            new = w.masked_fill(m, 0)
            ref.write(new)
            stored = ref.read()  # read back: proves the format stored the change
            zeros_after += int((stored == 0).sum())
            after = _sparsity(stored)
            layers.append({"name": ref.name, "shape": list(ref.shape), "sparsity_before": round(before[i], 6),
                           "sparsity_after": round(after, 6), "bits": dtype_bits(stored)})
            ctx.progress((i + 1) / len(refs), f"pruned {ref.name}")
        if changed == 0:
            raise EngineError("no_effect", f"steps[{ctx.index}]: the matched weights are already at or above "
                                           f"{spec.sparsity:.3f} sparsity; pruning changed nothing")
        total = sum(w.numel() for w in weights)
        zeros_before = sum(b * w.numel() for b, w in zip(before, weights))
        return {
            "type": "prune", "method": spec.method, "scope": spec.scope, "pattern": spec.pattern,
            "target_sparsity": spec.sparsity, "layers": layers, "weights_pruned": changed,
            "eligible_params": total, "sparsity_before": round(zeros_before / total, 6),
            "sparsity_after": round(zeros_after / total, 6),
            "skipped": sorted({r.name for r in eligible} - {r.name for r in refs}),
        }
