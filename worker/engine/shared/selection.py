"""What a step works on: the weights its targets/ignore select, or the model's eager module."""

from __future__ import annotations

from torch import nn

from app.recipes import StepSpec
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, WeightRef


def select(refs: list[WeightRef], spec: StepSpec) -> list[WeightRef]:
    """The refs the step's targets/ignore patterns select."""
    return [r for r in refs if spec.selects(r.name)]


def selected_weights(model: LoadedModel, spec: StepSpec, index: int) -> tuple[list, list]:
    """(eligible weights, those the step's targets/ignore select), or no_effect when the selection is empty."""
    eligible = get_format(model.format).eligible_weights(model)
    refs = select(eligible, spec)
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
