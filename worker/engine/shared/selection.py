"""What a step works on: the weights its targets/ignore select, or the model's eager module."""

from __future__ import annotations

from torch import nn

from app.recipes import StepSpec
from app.recipes.steps import matches
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, WeightRef


def select(refs: list[WeightRef], spec: StepSpec, index: int | None = None) -> list[WeightRef]:
    """The refs the step's targets/ignore patterns select; EngineError("no_effect") naming any pattern that
    matches no eligible weight (a mistyped pattern must not pass silently as a change to every layer)."""
    unmatched = [(field, p) for field, patterns in (("targets", spec.targets or []), ("ignore", spec.ignore))
                 for p in patterns if not any(matches(p, r.name) for r in refs)]
    if unmatched:
        where = f"steps[{index}]: " if index is not None else ""
        names = [r.name for r in refs]
        raise EngineError("no_effect", f"{where}" + "; ".join(f"{field} pattern {p!r}" for field, p in unmatched)
                          + f" matches no eligible weight (fnmatch on parameter names, or re:<regex>); eligible: "
                          f"{names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)} in all)")
    return [r for r in refs if spec.selects(r.name)]


def selected_weights(model: LoadedModel, spec: StepSpec, index: int) -> tuple[list, list]:
    """(eligible weights, those the step's targets/ignore select), or no_effect when the selection is empty."""
    eligible = get_format(model.format).eligible_weights(model)
    refs = select(eligible, spec, index)
    if not refs:
        raise EngineError("no_effect", f"steps[{index}]: no eligible weight matched targets={spec.targets} "
                                       f"ignore={spec.ignore}; eligible: {[r.name for r in eligible][:50]}")
    return eligible, refs


def eager_module(model: LoadedModel, what: str) -> nn.Module:
    """The model's nn.Module, or EngineError("unsupported") for graph formats (pt2, ONNX)."""
    if model.format not in ("package", "hf") or not isinstance(model.handle, nn.Module):
        raise EngineError("unsupported", f"{what} needs an eager model (a model package or a Hugging Face folder), "
                                         f"not {model.format}")
    return model.handle
