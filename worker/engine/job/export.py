"""The write stage: every output written to out/, then each step's report amended to what was written.

A step whose change exists only in a written file (graph quantization) writes that output itself (Pass.export);
the model's format writes the others. safetensors is the compact storage of the parameters, checked to restore
exactly (worker/engine/compact).
"""

from __future__ import annotations

from pathlib import Path

from worker.engine.compact import write_model
from worker.engine.job.context import JobContext
from worker.engine.job.load import Loaded
from worker.engine.job.measure_original import Original
from worker.engine.pipeline import AppliedStep

ARTIFACT_NAMES = {"pt2": "model.pt2", "onnx": "model.onnx", "package": "model.zip", "hf": "model-hf.zip",
                  "safetensors": "model.safetensors", "gguf": "model.gguf"}


def export(job: JobContext, loaded: Loaded, original: Original, applied: list[AppliedStep]) -> list[dict]:
    """Write the outputs; returns the artifacts ({name, format, path}, path relative to out/)."""
    artifacts = []
    with job.stage("write", "writing artifacts"):
        for i, target in enumerate(job.outputs):
            name = ARTIFACT_NAMES[target]
            if target == "safetensors":
                write_model(loaded.model, job.out_dir / name)
            else:
                job.notes += _write(job, loaded, target, job.out_dir / name, original.examples, applied)
            artifacts.append({"name": name, "format": target, "path": name})
            job.channel.progress("write", (i + 1) / len(job.outputs), f"wrote {name}")
        for step in applied:
            step.pass_.finalize(step.report, job.outputs)
    return artifacts


def _write(job: JobContext, loaded: Loaded, target: str, path: Path, examples, applied: list[AppliedStep]
           ) -> list[str]:
    for step in applied:
        notes = step.pass_.export(loaded.model, target, path, examples, job.work)
        if notes is not None:
            return notes
    return job.fmt.export(loaded.model, target, path, examples)
