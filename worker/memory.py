"""A job's sandbox memory limit, scaled to the size of the models it loads (docs/operations.md#large-models):
refused before anything is staged when it would pass the worker's cap. The limit is the sandbox's cgroup memory
limit where the host delegates one, else its RLIMIT_AS (worker/cgroups.py, worker/isolation.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.config import Settings


@dataclass(frozen=True)
class MemoryBudget:
    """The sandbox's memory limit for one job, scaled to the size of the models it loads."""

    input_bytes: int  # the model file plus any teacher models
    needed_bytes: int  # overhead + per_model_byte x input_bytes
    limit_bytes: int  # the sandbox's memory limit (its cgroup's, else RLIMIT_AS): needed, floored, capped
    cap_bytes: int

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.cap_bytes

    def as_event(self) -> dict[str, int]:
        return {"memory_limit_bytes": self.limit_bytes, "memory_needed_bytes": self.needed_bytes,
                "model_input_bytes": self.input_bytes}

    def refusal(self, settings: Settings) -> str:
        return (f"the job's models ({gib(self.input_bytes)}) would need about {gib(self.needed_bytes)} of sandbox "
                f"memory (SQUEEZE_SANDBOX_MEMORY_OVERHEAD_BYTES={settings.sandbox_memory_overhead_bytes} + "
                f"SQUEEZE_SANDBOX_MEMORY_PER_MODEL_BYTE={settings.sandbox_memory_per_model_byte:g} x model bytes), "
                f"more than SQUEEZE_SANDBOX_MEMORY_MAX_BYTES={self.cap_bytes} ({gib(self.cap_bytes)}); run it on a "
                "worker whose cap is raised to fit, or upload a smaller model")


def gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def sandbox_memory(settings: Settings, input_bytes: int) -> MemoryBudget:
    """limit = min(cap, max(floor, overhead + factor x input_bytes)); the cap never goes below the floor. A job
    whose need is past the cap does not fit (`fits` is False) and is refused before anything is staged."""
    needed = settings.sandbox_memory_overhead_bytes + math.ceil(settings.sandbox_memory_per_model_byte * input_bytes)
    cap = max(settings.sandbox_memory_max_bytes, settings.sandbox_memory_bytes)
    return MemoryBudget(input_bytes, needed, min(cap, max(settings.sandbox_memory_bytes, needed)), cap)
