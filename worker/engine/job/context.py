"""What every stage of a job reads: job.json parsed, the folders, the thread counts, the device, timings, notes."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from app.recipes import EvaluateSpec, Recipe
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats._openvino import require_openvino
from worker.engine.formats.base import ModelFormat


class Channel(Protocol):
    """The sandbox's protocol channel, as a job uses it."""

    def send(self, message: dict[str, Any]) -> None: ...

    def progress(self, stage: str, fraction: float, message: str = "") -> None: ...


@dataclass
class JobContext:
    jobdir: Path
    channel: Channel
    spec: dict[str, Any]  # job.json
    recipe: Recipe
    outputs: list[str]  # formats to write, in order
    threads: int  # the sandbox's
    timing_threads: int  # what each runtime gets while timed
    device: str  # "cpu" or "cuda", where training runs
    fmt: ModelFormat  # the input model's format
    started: float  # perf_counter at the start of the job
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    notes: list[str] = field(default_factory=list)

    @property
    def in_format(self) -> str:
        return self.fmt.name

    @property
    def ev(self) -> EvaluateSpec:
        return self.recipe.evaluate

    @property
    def out_dir(self) -> Path:
        return self.jobdir / "out"

    @property
    def work(self) -> Path:
        return self.jobdir / "work"

    @contextlib.contextmanager
    def stage(self, name: str, message: str = "") -> Iterator[None]:
        self.channel.progress(name, 0.0, message or name)
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 4)

    def inside(self, rel: str) -> Path:
        """A path job.json names, or ValueError when it leads outside the job directory."""
        path = (self.jobdir / rel).resolve()
        if self.jobdir.resolve() not in path.parents:
            raise ValueError(f"job.json path {rel!r} is outside the job directory")
        return path


def open_job(jobdir: Path, channel: Channel) -> JobContext:
    """job.json read and checked, torch set to the sandbox's threads and seed, out/ and work/ made."""
    import torch

    started = time.perf_counter()
    jobdir = jobdir.resolve()
    spec = json.loads((jobdir / "job.json").read_text(encoding="utf-8"))
    recipe = Recipe.model_validate(spec["recipe"])
    in_format = spec["model"]["format"]
    outputs: list[str] = list(spec.get("outputs") or recipe.outputs or [in_format])
    threads = max(1, int(spec.get("threads") or 1))
    torch.set_num_threads(threads)
    # Not set_num_interop_threads(1): measured here, it made a 0.1 ms b32 MLP call take 24 ms.
    torch.manual_seed(0)
    (jobdir / "out").mkdir(exist_ok=True)
    (jobdir / "work").mkdir(exist_ok=True)
    fmt = get_format(in_format)
    ev = recipe.evaluate
    if "openvino" in (ev.runtimes or ()):  # runtime_unavailable now, not after the steps
        require_openvino()
    notes = []
    if ev.threads and ev.threads > threads:
        notes.append(f"evaluate.threads {ev.threads} capped to the sandbox's {threads}")
    return JobContext(jobdir=jobdir, channel=channel, spec=spec, recipe=recipe, outputs=outputs, threads=threads,
                      timing_threads=min(ev.threads or threads, threads),
                      device=resolve_device(recipe.device, spec.get("device") or "auto"), fmt=fmt, started=started,
                      notes=notes)


def resolve_device(wanted: str, worker_device: str) -> str:
    """The recipe's `device` against the worker's setting and hardware: "cpu" or "cuda", or
    EngineError("device_unavailable") at once when CUDA is asked for and this worker cannot give it."""
    import torch

    has_cuda = worker_device != "cpu" and torch.cuda.is_available()
    if wanted == "cuda" and not has_cuda:
        why = "its settings say SQUEEZE_DEVICE=cpu" if worker_device == "cpu" else "torch sees no CUDA device"
        raise EngineError("device_unavailable", f"the recipe asks for device cuda, but this worker has none ({why}); "
                                                "use device auto or cpu, or run a worker on a GPU host")
    if wanted == "cpu" or worker_device == "cpu":
        return "cpu"
    return "cuda" if has_cuda else "cpu"
