"""Entry point of the untrusted side: `python -I -m worker.sandbox JOBDIR`.

Runs with an empty environment inside the supervisor's limits. Reads JOBDIR/job.json, loads the model,
evaluates it, applies the recipe, writes the result in each output format plus report.json to
JOBDIR/out/, and speaks JSON lines on stdout (the protocol channel):

  {"type": "progress", "progress": 0..1, "stage": str, "message": str}
  {"type": "event", "name": "step_done", "data": {...step report...}}
  {"type": "result", "metrics": {...}, "artifacts": [{name, format, path}], "engine_seconds": float}
  {"type": "error", "code": str, "message": str}

Exit status: 0 success, 2 a user-side failure (bad_model, bad_dataset, no_effect, unsupported),
1 an internal error (code "internal"; the traceback goes to stderr).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any, Iterator

REPORT_SCHEMA_VERSION = 1
# Progress fraction at the start of each stage; a stage reports within [start, next start).
_STAGE_SPAN = {"load": (0.0, 0.05), "evaluate_original": (0.05, 0.25), "steps": (0.25, 0.6),
               "write": (0.6, 0.75), "evaluate_result": (0.75, 0.98), "report": (0.98, 1.0)}
_ARTIFACT_NAMES = {"pt2": "model.pt2", "onnx": "model.onnx", "package": "model.zip", "hf": "model-hf.zip",
                   "safetensors": "model.safetensors"}


def take_protocol_channel() -> IO[str]:
    """Keep a private copy of fd 1 for protocol lines and point fd 1 at stderr.

    Done before anything else runs, so a print() in user model code (or a library) lands on stderr and
    can never forge a protocol line.
    """
    sys.stdout.flush()
    private = os.dup(1)  # os.dup makes a non-inheritable fd: child processes do not get the channel
    os.dup2(2, 1)
    return os.fdopen(private, "w", encoding="utf-8", buffering=1)


class Channel:
    def __init__(self, stream: IO[str]):
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self.stream.write(json.dumps(_finite(message), allow_nan=False, default=str) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        key = "steps" if stage.startswith("steps[") else stage
        start, end = _STAGE_SPAN[key]
        value = start + (end - start) * min(max(fraction, 0.0), 1.0)
        self.send({"type": "progress", "progress": round(value, 4), "stage": stage, "message": message})


def _finite(value: Any) -> Any:
    """NaN/inf (a diverged model's outputs) become null: JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextlib.contextmanager
def blame(code: str, what: str) -> Iterator[None]:
    """Turn any failure inside into EngineError(code): for code paths that run the user's model or data."""
    from worker.engine.errors import EngineError

    try:
        yield
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(code, f"{what}: {type(exc).__name__}: {str(exc)[:2000]}") from exc


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"job.json path {rel!r} is outside the job directory")
    return path


class Job:
    def __init__(self, jobdir: Path, channel: Channel):
        self.jobdir = jobdir.resolve()
        self.channel = channel
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str, message: str = "") -> Iterator[None]:
        self.channel.progress(name, 0.0, message or name)
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 4)

    def run(self) -> dict[str, Any]:
        import torch

        from app.recipes import NATIVE_RUNTIME, Recipe
        from worker.engine import metrics
        from worker.engine.datasets import arrange, load_dataset, synthetic_inputs
        from worker.engine.errors import EngineError
        from worker.engine.formats import get_format
        from worker.engine.pipeline import run_steps

        started = time.perf_counter()
        spec = json.loads((self.jobdir / "job.json").read_text(encoding="utf-8"))
        recipe = Recipe.model_validate(spec["recipe"])
        in_format = spec["model"]["format"]
        outputs: list[str] = list(spec.get("outputs") or recipe.outputs or [in_format])
        threads = max(1, int(spec.get("threads") or 1))
        torch.set_num_threads(threads)
        # Not set_num_interop_threads(1): measured here, it made a 0.1 ms b32 MLP call take 24 ms.
        torch.manual_seed(0)
        out_dir = self.jobdir / "out"
        out_dir.mkdir(exist_ok=True)
        work = self.jobdir / "work"
        work.mkdir(exist_ok=True)
        fmt = get_format(in_format)
        ev = recipe.evaluate
        timing_threads = min(ev.threads or threads, threads)
        if ev.threads and ev.threads > threads:
            self.notes.append(f"evaluate.threads {ev.threads} capped to the sandbox's {threads}")
        device = resolve_device(recipe.device, spec.get("device") or "auto")

        with self.stage("load", f"loading the {in_format} model"):
            model_path = _inside(self.jobdir, spec["model"]["path"])
            model = fmt.load(model_path, work)
            model.extra["outputs"] = list(outputs)  # a quantize step picks eager or graph quantization by them
            datasets = {name: load_dataset(_inside(self.jobdir, rel), name)
                        for name, rel in (spec.get("datasets") or {}).items() if rel}
            teachers = {ident: (_inside(self.jobdir, t["path"]), t["format"])
                        for ident, t in (spec.get("teachers") or {}).items()}

        with self.stage("evaluate_original", "measuring the original model"):
            specs = fmt.input_specs(model)
            data = datasets.get(ev.dataset)
            labels = None
            if data is not None:
                inputs = [a[: ev.max_samples] for a in arrange(data, specs)]
                labels = None if data.labels is None else data.labels[: ev.max_samples]
            else:
                inputs = synthetic_inputs(specs, fmt.example_inputs(model), max(ev.batch_sizes))
                if inputs is None:
                    raise EngineError("bad_dataset", f"no {ev.dataset!r} dataset was given and the model's input "
                                                     "shapes are unknown: upload an eval dataset (or, for a package, "
                                                     "example_inputs.safetensors)")
                self.notes.append(f"no {ev.dataset!r} dataset: accuracy and agreement are not measured; latency "
                                  "and output similarity use random inputs of the model's shapes")
            examples = fmt.example_inputs(model) or [a[:2] for a in inputs]
            # Runtimes both the original and the result run on are timed once, alternately, after the steps
            # (metrics.latency_pair); here and for the result only the others are timed on their own.
            original_runtimes = ev.runtimes or [NATIVE_RUNTIME[in_format]]
            runnable_outputs = [o for o in outputs if o != "safetensors"]
            result_format = get_format((runnable_outputs or [in_format])[0])
            wanted = ev.runtimes or [NATIVE_RUNTIME[result_format.name]]
            if not ev.runtimes and "onnxruntime" in wanted and "onnxruntime" not in original_runtimes:
                original_runtimes = [*original_runtimes, "onnxruntime"]  # so an ONNX result has a baseline
            # A torch original is timed on onnxruntime as its own fp32 ONNX export: int8 ONNX against fp32 ONNX.
            original_onnx = self.original_as_onnx(fmt, model, examples, work) \
                if "onnxruntime" in original_runtimes and "onnxruntime" not in fmt.runtimes else None
            original_rts = set(fmt.runtimes) | ({"onnxruntime"} if original_onnx is not None else set())
            paired = sorted(set(original_runtimes) & original_rts & set(wanted) & set(result_format.runtimes))
            original, reference = self.measure(model, model_path, ev, original_runtimes, inputs, labels,
                                               timing_threads, "original", blame_code="bad_model",
                                               skip_latency=paired)
            if original_onnx is not None and "onnxruntime" not in paired:
                with blame("bad_model", "the original's ONNX export failed to run"):
                    original["latency_ms"]["onnxruntime"] = metrics.latency(
                        get_format("onnx").runner(original_onnx, "onnxruntime", timing_threads), inputs,
                        ev.batch_sizes, ev.warmup, ev.repeats, None, self.notes,
                        "original (fp32 ONNX export) on onnxruntime")
            layers_before = metrics.layer_sparsity(model)
            torch.set_num_threads(threads)  # a torch runner set the timing threads; the steps get them all

        def on_progress(fraction: float, stage: str, message: str) -> None:
            self.channel.progress(stage, fraction, message)

        def on_step(report: dict) -> None:
            self.channel.send({"type": "event", "name": "step_done", "data": report})

        def on_event(name: str, data: dict) -> None:
            self.channel.send({"type": "event", "name": name, "data": data})

        with self.stage("steps", "applying the recipe"):
            step_reports = run_steps(model, recipe, datasets=datasets, threads=threads, workdir=work,
                                     progress=on_progress, on_step_done=on_step, on_event=on_event,
                                     teachers=teachers, device=device,
                                     timing=(timing_threads, max(ev.batch_sizes)))

        with self.stage("write", "writing artifacts"):
            artifacts = []
            for i, target in enumerate(outputs):
                name = _ARTIFACT_NAMES[target]
                if target == "safetensors":  # compact storage of the parameters; checked to restore exactly
                    from worker.engine.compact import write_model

                    write_model(model, out_dir / name)
                else:
                    from worker.engine.passes.quantize import export_output

                    self.notes += export_output(fmt, model, target, out_dir / name, examples, work)
                artifacts.append({"name": name, "format": target, "path": name})
                self.channel.progress("write", (i + 1) / len(outputs), f"wrote {name}")
            from worker.engine.passes.quantize import amend_step_report

            amend_step_report(model, step_reports, outputs)

        with self.stage("evaluate_result", "measuring the result re-loaded from disk"):
            # A safetensors artifact runs as the input model with its weights: measured as the result only when
            # it is the only output, else reported as an extra size (safetensors_size_bytes).
            compact_art = next((a for a in artifacts if a["format"] == "safetensors"), None)
            compressed: dict[str, Any] | None = None
            result_outputs = None
            first_model = None
            for art in artifacts:
                if art["format"] == "safetensors" and runnable_outputs:
                    continue
                afmt = get_format(in_format if art["format"] == "safetensors" else art["format"])
                runtimes = [rt for rt in wanted if rt in afmt.runtimes and rt not in paired]
                if compressed is not None:
                    runtimes = [rt for rt in runtimes if rt not in compressed["latency_ms"]]
                    if not runtimes:
                        continue
                if art["format"] == "safetensors":
                    from worker.engine.compact import load_compact, restore_into

                    loaded = afmt.load(model_path, work)  # the original again, with the stored weights put in
                    restore_into(loaded, load_compact(out_dir / art["path"]))
                else:
                    loaded = afmt.load(out_dir / art["path"], work)
                side, outs = self.measure(loaded, out_dir / art["path"], ev, runtimes, inputs, labels,
                                          timing_threads, f"result ({art['name']})", blame_code=None)
                if compressed is None and paired:
                    # Original and result timed alternately, so a load change during the job hits both alike.
                    original_again = fmt.load(model_path, work)
                    for rt in paired:
                        run_original = fmt.runner(original_again, rt, timing_threads) if rt in fmt.runtimes \
                            else get_format("onnx").runner(original_onnx, rt, timing_threads)
                        original["latency_ms"][rt], side["latency_ms"][rt] = metrics.latency_pair(
                            run_original, afmt.runner(loaded, rt, timing_threads), inputs,
                            ev.batch_sizes, ev.warmup, ev.repeats, fmt.fixed_batch(original_again))
                if compressed is None:
                    compressed, result_outputs, first_model = side, outs, loaded
                else:
                    compressed["latency_ms"].update(side["latency_ms"])
            fid = metrics.fidelity(reference, result_outputs)
            if data is None:
                fid["agreement"] = None
            compressed.update(fid)
            layers_after = metrics.layer_sparsity(first_model)
            if compact_art is not None:
                compressed["safetensors_size_bytes"] = (out_dir / compact_art["path"]).stat().st_size
                if not runnable_outputs:
                    compressed["format"] = "safetensors"

        in_memory_after = {layer["name"]: layer["sparsity_after"] for r in step_reports for layer in r.get("layers", [])}
        bits_after = {layer["name"]: layer["bits"] for r in step_reports for layer in r.get("layers", [])
                      if "bits" in layer}  # the last step that touched a layer sets its bits per weight
        shape_after = {layer["name"]: layer["shape_after"] for r in step_reports for layer in r.get("layers", [])
                       if layer.get("shape_after")}  # channel pruning changes shapes
        layers = [{"name": name, "shape": info["shape"], "sparsity_before": info["sparsity"],
                   "sparsity_after": layers_after.get(name, {}).get("sparsity", in_memory_after.get(name)),
                   "bits": bits_after.get(name), "shape_after": shape_after.get(name, info["shape"])}
                  for name, info in layers_before.items()]
        result_metrics = {"original": original, "compressed": compressed,
                          "ratios": metrics.ratios(original, compressed), "layers": layers}
        if compact_art is not None:
            result_metrics["ratios"]["safetensors_size"] = round(
                original["size_bytes"] / compressed["safetensors_size_bytes"], 4)
        result_metrics["flags"] = metrics.flags(result_metrics["ratios"], original, compressed)

        self.channel.progress("report", 0.0, "writing report.json")
        engine_seconds = round(time.perf_counter() - started, 4)
        from app.reports import check_guard

        # Informational: the supervisor checks the guard again from the metrics and decides the job's status.
        guard = check_guard(recipe.guard, result_metrics)
        recipe_json = recipe.model_dump(mode="json")
        recipe_hash = hashlib.sha256(json.dumps(recipe_json, sort_keys=True).encode()).hexdigest()
        environment = _environment(threads, timing_threads)
        # The job object carries what explains a difference between reruns, not only report.json.
        result_metrics["run"] = {"recipe_hash": recipe_hash, "model_sha256": spec["model"].get("sha256"),
                                 "device": device, "environment": environment, "timings": self.timings,
                                 "step_seconds": [r.get("seconds") for r in step_reports]}
        report = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "job_id": spec.get("job_id"),
            "device": device,
            "model": {"format": in_format, "path": spec["model"]["path"], "sha256": spec["model"].get("sha256")},
            "recipe": recipe_json,
            "recipe_hash": recipe_hash,
            "guard": guard,
            "outputs": outputs,
            "metrics": result_metrics,
            "steps": step_reports,
            "layers": layers,
            "timings": self.timings,
            "engine_seconds": engine_seconds,
            "notes": self.notes,
            "environment": environment,
        }
        try:
            from worker.engine.report_plot import render

            png, _ = render(result_metrics, layers, f"{spec.get('job_id') or 'job'}: {in_format} -> "
                                                    f"{', '.join(outputs)}")
            (out_dir / "report.png").write_bytes(png)
            artifacts.append({"name": "report.png", "format": "png", "path": "report.png"})
        except Exception as exc:  # a picture must never fail a job whose numbers are measured
            self.notes.append(f"report.png not rendered: {type(exc).__name__}: {exc}")
        (out_dir / "report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False, default=str),
                                             encoding="utf-8")
        artifacts.append({"name": "report.json", "format": "json", "path": "report.json"})
        self.channel.progress("report", 1.0, "done")
        return {"type": "result", "metrics": result_metrics, "artifacts": artifacts, "engine_seconds": engine_seconds}

    def original_as_onnx(self, fmt, model, examples, work: Path):
        """The original exported to fp32 ONNX and loaded (for timing on onnxruntime), or None with a note."""
        from worker.engine.formats import get_format

        path = work / "original-fp32.onnx"
        try:
            fmt.export(model, "onnx", path, examples)
            loaded = get_format("onnx").load(path, work)
        except Exception as exc:  # noqa: BLE001  (a missing baseline must not fail the job)
            self.notes.append(f"original on onnxruntime: not measured, its ONNX export failed ({type(exc).__name__})")
            return None
        self.notes.append("original on onnxruntime: timed as its fp32 ONNX export")
        return loaded

    def measure(self, model, path: Path, ev, runtimes: list[str], inputs, labels, threads: int, label: str,
                blame_code: str | None, skip_latency: list[str] = ()):
        """Stats, latency on each runtime the format has (but `skip_latency`, timed elsewhere), and outputs on
        `inputs` (for accuracy and fidelity)."""
        from worker.engine import metrics
        from worker.engine.formats import get_format

        fmt = get_format(model.format)
        stats = metrics.model_stats(model, path)
        runnable = [rt for rt in runtimes if rt in fmt.runtimes] or [fmt.runtimes[0]]
        if runnable[0] == "torch-compile":  # outputs from the eager run: a compile per predict chunk size is waste
            runnable.insert(0, fmt.runtimes[0])
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
                    latency[rt] = metrics.latency(run, inputs, ev.batch_sizes, ev.warmup, ev.repeats, fixed,
                                                  self.notes, f"{label} on {rt}")
        stats["latency_ms"] = latency
        stats["accuracy"] = metrics.accuracy(outputs, labels)
        stats["macs"] = metrics.macs(model, inputs)
        return stats, outputs


def resolve_device(wanted: str, worker_device: str) -> str:
    """The recipe's `device` against the worker's setting and hardware: "cpu" or "cuda", or
    EngineError("device_unavailable") at once when CUDA is asked for and this worker cannot give it."""
    import torch

    from worker.engine.errors import EngineError

    has_cuda = worker_device != "cpu" and torch.cuda.is_available()
    if wanted == "cuda" and not has_cuda:
        why = "its settings say SQUEEZE_DEVICE=cpu" if worker_device == "cpu" else "torch sees no CUDA device"
        raise EngineError("device_unavailable", f"the recipe asks for device cuda, but this worker has none ({why}); "
                                                "use device auto or cpu, or run a worker on a GPU host")
    if wanted == "cpu" or worker_device == "cpu":
        return "cpu"
    return "cuda" if has_cuda else "cpu"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(threads: int, timing_threads: int) -> dict[str, Any]:
    """What a rerun needs to explain a difference: hardware, threads (the sandbox's, and those each runtime got
    while timed) and the version of every library used."""
    from importlib import metadata

    import torch

    versions = {}
    for dist in ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "safetensors", "torch-pruning", "torchao",
                 "transformers", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "gpu": gpu, "threads": threads, "timing_threads": timing_threads,
            "libraries": versions,
            # kept at the top level for earlier readers of the report
            "torch": torch.__version__, "onnx": versions["onnx"], "onnxruntime": versions["onnxruntime"],
            "numpy": versions["numpy"]}


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kind):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def warm_up(channel: Channel) -> bool:
    """`--warm`: import what every job needs, say `ready`, then wait for the supervisor's `go` on stdin (the job
    is staged meanwhile). False when the supervisor closed stdin instead: this sandbox is thrown away unused.
    A warm sandbox runs one job only (worker/warm.py)."""
    import matplotlib
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: F401  (report.png; its first import builds a font cache: ~1 s)

    import worker.engine.datasets  # noqa: F401
    import worker.engine.formats  # noqa: F401
    import worker.engine.metrics  # noqa: F401
    import worker.engine.pipeline  # noqa: F401
    import worker.engine.report_plot  # noqa: F401

    channel.send({"type": "ready"})
    return sys.stdin.readline().strip() == "go"


def main(argv: list[str] | None = None) -> int:
    channel = Channel(take_protocol_channel())
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--warm"]:
        argv = argv[1:]
        if not warm_up(channel):
            return 0
    if len(argv) != 1:
        channel.send({"type": "error", "code": "internal",
                      "message": "usage: python -m worker.sandbox [--warm] JOBDIR"})
        return 1
    try:
        from worker.engine.errors import EngineError
    except BaseException as exc:  # noqa: BLE001  (a broken install must still answer on the channel)
        traceback.print_exc()
        channel.send({"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    try:
        result = Job(Path(argv[0]), channel).run()
    except EngineError as exc:
        # Out of memory under the sandbox's limit is the limit's doing, whichever step ran into it.
        code = "resource_limit" if _caused_by(exc, MemoryError) else exc.code
        channel.send({"type": "error", "code": code, "message": exc.message})
        return 2
    except MemoryError:
        channel.send({"type": "error", "code": "resource_limit", "message": "out of memory under the sandbox limit"})
        return 2
    except BaseException as exc:  # noqa: BLE001  (user code may raise SystemExit; report it, don't vanish)
        traceback.print_exc()
        channel.send({"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {str(exc)[:2000]}"})
        return 1
    channel.send(result)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every output is written and closed and the result sent: skip the interpreter's teardown of torch and
    # ONNX Runtime (about 0.5 s on the bench host), which only delays the job's end.
    os._exit(status)
