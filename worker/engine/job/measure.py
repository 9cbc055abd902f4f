"""One model measured on the evaluation inputs: stats, latency per runtime, accuracy, MACs, and its outputs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from app.recipes import EvaluateSpec
from worker.engine import metrics
from worker.engine.errors import blame
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel


def measure(model: LoadedModel, path: Path, ev: EvaluateSpec, runtimes: list[str], inputs, labels, threads: int,
            label: str, blame_code: str | None, notes: list[str], skip_latency: list[str] = ()):
    """Stats, latency on each runtime the format has (but `skip_latency`, timed elsewhere), and outputs on
    `inputs` (for accuracy and fidelity)."""
    fmt = get_format(model.format)
    stats = metrics.model_stats(model, path)
    # Outputs (accuracy, fidelity) always from the format's own runtime, whatever else is timed: the original's and
    # the result's then come from the same runtime (and a torch-compile compile per predict chunk size is waste).
    runnable = [fmt.runtimes[0], *(rt for rt in runtimes if rt in fmt.runtimes)]
    guard = blame(blame_code, f"the {label} model failed to run on the evaluation inputs") if blame_code \
        else contextlib.nullcontext()
    fixed = fmt.fixed_batch(model)
    latency: dict[str, Any] = {}
    outputs = None
    with guard:
        for rt in dict.fromkeys(runnable):
            if outputs is not None and not (rt in runtimes and rt not in skip_latency):
                continue
            run = fmt.runner(model, rt, threads)
            if outputs is None:
                outputs = metrics.predict(run, inputs, fixed)
            if rt in runtimes and rt not in skip_latency:
                latency[rt] = metrics.latency(run, inputs, ev.batch_sizes, ev.warmup, ev.repeats, fixed, notes,
                                              f"{label} on {rt}")
    stats["latency_ms"] = latency
    stats["accuracy"] = metrics.accuracy(outputs, labels)
    stats["macs"] = metrics.macs(model, inputs)
    return stats, outputs
