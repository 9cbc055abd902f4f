"""What every model format provides to the engine, and the handle a loaded model travels in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

# A runner takes the model inputs (batch first, in the model's input order) and returns the first output.
Runner = Callable[[list[np.ndarray]], np.ndarray]


@dataclass
class InputSpec:
    """One model input: its name, shape (None for a dynamic dim) and numpy dtype, when known."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype | None


@dataclass
class WeightRef:
    """A weight tensor a pass may edit: `read()` gives its values, `write(t)` stores new values in the model."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    write: Callable[[torch.Tensor], None]


@dataclass
class LoadedModel:
    """A model in memory. `handle` is format-specific (ExportedProgram, onnx.ModelProto, nn.Module)."""

    format: str
    path: Path
    handle: Any
    extra: dict[str, Any] = field(default_factory=dict)


class ModelFormat:
    """A model format: how to load, inspect, run, edit and write it.

    An implementer must guarantee:
    - `load` never reaches outside `path` and `workdir` (no external files, no network), and turns every
      failure to load into EngineError("bad_model", ...), never a raw exception.
    - `eligible_weights` returns only weights of Linear/Conv-like layers (ndim >= 2) and its `write`
      changes the tensor the model actually computes with and that `save` writes; a pass relies on
      this to prove its effect.
    - `save(model, path)` writes a single file that `load` reads back to the same values.
    - `export(model, target, path, examples)` writes the model in another format (or raises
      EngineError("unsupported")) and returns notes for the report (fallbacks taken).
    - `runner` returns a function whose outputs are numpy arrays of the first model output.
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    runtimes: ClassVar[tuple[str, ...]]

    def load(self, path: Path, workdir: Path) -> LoadedModel:
        raise NotImplementedError

    def save(self, model: LoadedModel, path: Path) -> None:
        raise NotImplementedError

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None) -> list[str]:
        raise NotImplementedError

    def eligible_weights(self, model: LoadedModel) -> list[WeightRef]:
        raise NotImplementedError

    def parameters(self, model: LoadedModel) -> list[tuple[str, torch.Tensor]]:
        """All learnable tensors (for counts and overall sparsity)."""
        raise NotImplementedError

    def input_specs(self, model: LoadedModel) -> list[InputSpec] | None:
        """The inputs in call order, or None when the format cannot tell (an eager module without examples)."""
        raise NotImplementedError

    def example_inputs(self, model: LoadedModel) -> list[np.ndarray] | None:
        """Inputs shipped with the model (package examples, pt2 example inputs), or None."""
        return None

    def runner(self, model: LoadedModel, runtime: str, threads: int) -> Runner:
        raise NotImplementedError

    def fixed_batch(self, model: LoadedModel) -> int | None:
        """The batch size the model was frozen to, or None when the batch dim is dynamic or unknown."""
        specs = self.input_specs(model) or []
        for spec in specs:
            if spec.shape and spec.shape[0] is not None:
                return int(spec.shape[0])
        return None


_FORMATS: dict[str, ModelFormat] = {}


def register(cls: type[ModelFormat]) -> type[ModelFormat]:
    _FORMATS[cls.name] = cls()
    return cls


def registered(name: str) -> ModelFormat | None:
    """The registered format of that name; the formats register when worker.engine.formats is imported."""
    return _FORMATS.get(name)


def format_names() -> list[str]:
    return sorted(_FORMATS)


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple/list, or a dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            try:
                return first_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"model output has no tensor (got {type(out).__name__})")
