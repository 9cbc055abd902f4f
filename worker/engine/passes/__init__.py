"""Recipe step passes, one module per step type. Importing this package registers them (the allowlist).

A pass imports only the pass API (base.py) and shared helpers (worker/engine/shared/), never another pass.
"""

from app.recipes import StepSpec
from worker.engine.errors import EngineError
from worker.engine.passes import prune  # noqa: F401
from worker.engine.passes import channel, distill, finetune  # noqa: F401
from worker.engine.passes import cluster  # noqa: F401
from worker.engine.passes import quantize  # noqa: F401
from worker.engine.passes.base import PASSES, Pass, StepContext, StepReport, register

__all__ = ["PASSES", "Pass", "StepContext", "StepReport", "pass_for", "register"]


def pass_for(spec: StepSpec) -> Pass:
    cls = PASSES.get(type(spec))
    if cls is None:
        raise EngineError("unsupported", f"no pass for step type {getattr(spec, 'type', type(spec).__name__)!r}")
    return cls()
