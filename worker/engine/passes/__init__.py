"""Recipe step passes, one module per step type. Importing this package registers them (the allowlist)."""

from worker.engine.passes import prune  # noqa: F401
from worker.engine.passes import channel, distill, finetune  # noqa: F401
from worker.engine.passes import cluster  # noqa: F401
from worker.engine.passes import quantize  # noqa: F401
from worker.engine.passes.base import PASSES, Pass, StepContext, StepReport, pass_for, register

__all__ = ["PASSES", "Pass", "StepContext", "StepReport", "pass_for", "register"]
