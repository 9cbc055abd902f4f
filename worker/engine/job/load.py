"""The load stage: the model, the job's datasets and the distillation teachers it names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.engine.datasets import Dataset, load_dataset
from worker.engine.formats.base import LoadedModel
from worker.engine.job.context import JobContext


@dataclass
class Loaded:
    model: LoadedModel
    model_path: Path
    datasets: dict[str, Dataset]
    teachers: dict[str, tuple[Path, str]]  # model id -> (file, format)


def load(job: JobContext) -> Loaded:
    spec = job.spec
    with job.stage("load", f"loading the {job.in_format} model"):
        model_path = job.inside(spec["model"]["path"])
        model = job.fmt.load(model_path, job.work)
        datasets = {name: load_dataset(job.inside(rel), name)
                    for name, rel in (spec.get("datasets") or {}).items() if rel}
        teachers = {ident: (job.inside(t["path"]), t["format"])
                    for ident, t in (spec.get("teachers") or {}).items()}
    return Loaded(model=model, model_path=model_path, datasets=datasets, teachers=teachers)
