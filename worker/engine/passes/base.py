"""The pass extension point: one class per recipe step type, registered for its spec class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from app.recipes import StepSpec
from worker.engine.datasets import Dataset
from worker.engine.errors import EngineError
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


class Pass:
    """A compression step applied in place to a LoadedModel.

    An implementer must guarantee:
    - `apply` changes the model in place through the format's accessors (so `save` writes the change),
      and returns a step report: a JSON-able dict with at least `type` and, for weight edits, `layers`
      (name, shape, sparsity_before, sparsity_after) and overall figures.
    - It proves its effect: when nothing eligible matched `targets`/`ignore`, or nothing changed,
      it raises EngineError("no_effect", ...) instead of reporting success.
    - It never imports or calls anything named by a user string.
    """

    spec_type: ClassVar[type[StepSpec]]

    def apply(self, model: LoadedModel, spec: StepSpec, ctx: StepContext) -> StepReport:
        raise NotImplementedError


PASSES: dict[type[StepSpec], type[Pass]] = {}


def register(spec_type: type[StepSpec]) -> Callable[[type[Pass]], type[Pass]]:
    def deco(cls: type[Pass]) -> type[Pass]:
        if spec_type in PASSES:
            raise RuntimeError(f"{spec_type.__name__} already has a pass: {PASSES[spec_type].__name__}")
        cls.spec_type = spec_type
        PASSES[spec_type] = cls
        return cls

    return deco


def pass_for(spec: StepSpec) -> Pass:
    from worker.engine import passes  # noqa: F401  (registers the allowlist)

    cls = PASSES.get(type(spec))
    if cls is None:
        raise EngineError("unsupported", f"no pass for step type {getattr(spec, 'type', type(spec).__name__)!r}")
    return cls()
