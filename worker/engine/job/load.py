"""The load stage: the model, the job's datasets and the distillation teachers it names.

Text datasets (.txt, .jsonl, .parquet) are tokenized here, once the model is loaded, by the model's own tokenizer
(worker/engine/text.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.engine.datasets import Dataset, load_dataset
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel
from worker.engine.job.context import JobContext
from worker.engine.text import (
    TEXT_SUFFIXES,
    context_length,
    load_tokenizer,
    read_text,
    tokenize,
)


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
        paths = {name: job.inside(rel) for name, rel in (spec.get("datasets") or {}).items() if rel}
        datasets = {name: load_dataset(path, name) for name, path in paths.items()
                    if path.suffix not in TEXT_SUFFIXES}
        texts = {name: read_text(path, name) for name, path in paths.items() if path.suffix in TEXT_SUFFIXES}
        if texts:
            datasets.update(_tokenized(job, model, texts))
        teachers = {ident: (job.inside(t["path"]), t["format"])
                    for ident, t in (spec.get("teachers") or {}).items()}
    return Loaded(model=model, model_path=model_path, datasets=datasets, teachers=teachers)


def _tokenized(job: JobContext, model: LoadedModel, texts: dict) -> dict[str, Dataset]:
    if model.format != "hf":
        raise EngineError("bad_dataset", f"text datasets ({', '.join(sorted(texts))}) are tokenized by the model's "
                                         f"tokenizer: they need a Hugging Face model with its tokenizer files, not "
                                         f"{model.format}; upload token ids as a .npz instead")
    tokenizer = load_tokenizer(model.extra["folder"])
    context = context_length(model.handle.config)
    out = {name: tokenize(raw, tokenizer, job.recipe.text, context) for name, raw in texts.items()}
    for name, data in out.items():
        job.notes.append(f"dataset {name!r}: {len(data.stream):,} tokens of {data.kind} text, "
                         f"{data.size} windows of {job.recipe.text.seq_len} (the model's tokenizer)")
    return out
