"""Unstructured magnitude pruning, global or per layer, exact to the requested fraction."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from app.recipes import PruneSpec
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, WeightRef, get_format
from worker.engine.passes.base import Pass, StepContext, StepReport, register


def select(refs: list[WeightRef], targets: list[str] | None, ignore: list[str]) -> list[WeightRef]:
    """The refs whose name matches a target (all when None) and no ignore pattern."""
    return [r for r in refs
            if (targets is None or any(fnmatchcase(r.name, p) for p in targets))
            and not any(fnmatchcase(r.name, p) for p in ignore)]


def smallest_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly `k` smallest entries of a flat tensor; ties at the threshold broken by position.

    A plain `abs <= threshold` over-prunes when many weights tie (already-zero weights, quantized values).
    """
    mask = torch.zeros_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= magnitudes.numel():
        return ~mask
    threshold = torch.kthvalue(magnitudes, k).values
    mask = magnitudes < threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(magnitudes == threshold, as_tuple=True)[0][:need]
        mask[ties] = True
    return mask


def _sparsity(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / max(1, t.numel())


@register(PruneSpec)
class MagnitudePrune(Pass):
    def apply(self, model: LoadedModel, spec: PruneSpec, ctx: StepContext) -> StepReport:
        fmt = get_format(model.format)
        eligible = fmt.eligible_weights(model)
        refs = select(eligible, spec.targets, spec.ignore)
        if not refs:
            raise EngineError("no_effect", f"steps[{ctx.index}]: no eligible weight matched targets={spec.targets} "
                                           f"ignore={spec.ignore}; eligible: {[r.name for r in eligible][:50]}")
        weights = [r.read() for r in refs]
        before = [_sparsity(w) for w in weights]
        if spec.scope == "global":
            flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights])
            flat_mask = smallest_mask(flat, round(spec.sparsity * flat.numel()))
            masks = list(torch.split(flat_mask, [w.numel() for w in weights]))
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
                           "sparsity_after": round(after, 6)})
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
