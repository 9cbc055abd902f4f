"""The pass extension point: one class per recipe step type, registered for its spec class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from app.recipes import StepSpec
from worker.engine.datasets import Dataset
from worker.engine.formats.base import LoadedModel

StepReport = dict[str, Any]


@dataclass
class StepContext:
    """What a pass may use besides the model: the job's datasets, thread count, scratch folder, progress."""

    index: int
    datasets: dict[str, Dataset] = field(default_factory=dict)
    threads: int = 1
    workdir: Path = Path(".")
    progress: Callable[[float, str], None] = lambda fraction, message: None
    # Named events for the job's event log (e.g. one per training epoch).
    event: Callable[[str, dict[str, Any]], None] = lambda name, data: None
    # Distillation teachers: "original" and other model ids -> (file, format), loaded by the pass that needs one.
    teachers: dict[str, tuple[Path, str]] = field(default_factory=dict)
    device: str = "cpu"  # where training runs: "cpu" or "cuda" (resolved by the sandbox)
    # (threads, batch) at which the job times its result: a pass choosing between equivalent graphs by speed
    # times them the same way.
    timing: tuple[int, int] = (1, 32)
    # The formats the job writes (a quantize step picks eager or graph quantization by them); empty: the model's.
    outputs: list[str] = field(default_factory=list)
    # The passes of the job's earlier steps, in order, as they applied.
    earlier: list[Pass] = field(default_factory=list)


class Pass:
    """A compression step applied in place to a LoadedModel.

    An implementer must guarantee:
    - `apply` changes the model in place through the format's accessors (so `save` writes the change),
      and returns a step report: a JSON-able dict with at least `type` and, for weight edits, `layers`
      (name, shape, sparsity_before, sparsity_after) and overall figures.
    - It proves its effect: when nothing eligible matched `targets`/`ignore`, or nothing changed,
      it raises EngineError("no_effect", ...) instead of reporting success.
    - It never imports or calls anything named by a user string.

    Two later stages, for a pass whose change exists only in a written file (graph quantization): `export`
    writes an output in its place, and `finalize` brings its step report in line with what was written. Every
    other pass leaves both as they are here.
    """

    spec_type: ClassVar[type[StepSpec]]

    def apply(self, model: LoadedModel, spec: StepSpec, ctx: StepContext) -> StepReport:
        raise NotImplementedError

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None,
               workdir: Path) -> list[str] | None:
        """Write the output `target` at `path` and return its notes, or None: the model's format writes it."""
        return None

    def finalize(self, report: StepReport, written: list[str]) -> None:
        """Once every output is written (`written`: their formats), amend this step's report in place."""


PASSES: dict[type[StepSpec], type[Pass]] = {}


def register(spec_type: type[StepSpec]) -> Callable[[type[Pass]], type[Pass]]:
    def deco(cls: type[Pass]) -> type[Pass]:
        if spec_type in PASSES:
            raise RuntimeError(f"{spec_type.__name__} already has a pass: {PASSES[spec_type].__name__}")
        cls.spec_type = spec_type
        PASSES[spec_type] = cls
        return cls

    return deco
