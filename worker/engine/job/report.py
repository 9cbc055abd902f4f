"""The report stage: the job's metrics (original, result, ratios, layers, flags, run), the guard's verdict,
report.png, and report.json built as app/report_schema.Report, so a report that does not fit the schema fails the
job instead of reaching a reader."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from app.recipes import RUNTIMES_BY_FORMAT
from app.report_schema import REPORT_SCHEMA_VERSION, Report
from app.reports import check_guard
from worker.engine import metrics
from worker.engine.finite import finite
from worker.engine.job.context import JobContext
from worker.engine.job.environment import environment
from worker.engine.job.flags import flag_reasons
from worker.engine.job.load import Loaded
from worker.engine.job.measure_original import Original
from worker.engine.job.measure_result import Result


def layer_table(original: Original, result: Result, steps: list[dict]) -> list[dict[str, Any]]:
    """Per layer: shape and sparsity before and after, bits per weight (the last step that touched it sets them)."""
    touched = [layer for r in steps for layer in r.get("layers", [])]
    in_memory_after = {layer["name"]: layer["sparsity_after"] for layer in touched}
    bits_after = {layer["name"]: layer["bits"] for layer in touched if "bits" in layer}
    shape_after = {layer["name"]: layer["shape_after"] for layer in touched
                   if layer.get("shape_after")}  # channel pruning changes shapes
    return [{"name": name, "shape": info["shape"], "sparsity_before": info["sparsity"],
             "sparsity_after": result.layers_after.get(name, {}).get("sparsity", in_memory_after.get(name)),
             "bits": bits_after.get(name), "shape_after": shape_after.get(name, info["shape"])}
            for name, info in original.layers_before.items()]


def result_metrics(original: Original, result: Result, layers: list[dict], steps: list[dict],
                   outputs: list[str]) -> dict[str, Any]:
    """The measured figures; `ratios.size` is the best output's (named by `size_ratio_output`), each flag has its
    one-line reason in `flag_reasons`, and `recommendation` the fastest runtime and format per batch size."""
    before, after = original.stats, result.stats
    out = {"original": before, "compressed": after, "ratios": metrics.ratios(before, after), "layers": layers}
    if result.compact is not None:
        out["ratios"]["safetensors_size"] = round(before["size_bytes"] / after["safetensors_size_bytes"], 4)
    sizes = after.get("output_sizes") or {after["format"]: after["size_bytes"]}
    best = min(sizes, key=lambda fmt: sizes[fmt])
    out["ratios"]["size"] = round(before["size_bytes"] / sizes[best], 4) if sizes[best] else None
    out["size_ratio_output"] = best
    if result.llm is not None:
        out["llm"] = result.llm
    if recommended := recommendation(before, after, outputs):
        out["recommendation"] = recommended
    reasons = flag_reasons(out, steps, outputs)
    out["flags"], out["flag_reasons"] = list(reasons), reasons
    return out


def recommendation(original: dict[str, Any], result: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """Per batch size timed: the fastest of every model, runtime and format measured (the result's outputs and the
    original, read from their `latency_ms` medians), and as `runner_up` the fastest on another runtime or format
    (None when nothing else ran). A tie goes to the result."""
    in_format = original["format"]
    sides = (("result", result, [o for o in outputs if RUNTIMES_BY_FORMAT.get(o)]),
             ("original", original, [in_format, "onnx"]))  # the original on an ONNX runtime: its fp32 export
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for model, side, formats in sides:
        for rt, timings in (side.get("latency_ms") or {}).items():
            fmt = next((f for f in formats if rt in RUNTIMES_BY_FORMAT.get(f, ())), side["format"])
            for batch, timing in timings.items():
                by_batch.setdefault(batch, []).append({"runtime": rt, "format": fmt, "model": model,
                                                       "latency_ms": timing["median"]})
    out = {}
    for batch in sorted(by_batch, key=int):
        ranked = sorted(by_batch[batch], key=lambda c: c["latency_ms"])
        best = ranked[0]
        runner_up = next((c for c in ranked if (c["runtime"], c["format"]) != (best["runtime"], best["format"])),
                         None)
        out[batch] = {**best, "runner_up": runner_up}
    return out


def write_report(job: JobContext, loaded: Loaded, original: Original, steps: list[dict], result: Result,
                 artifacts: list[dict]) -> dict[str, Any]:
    """Writes report.png and report.json to out/; returns the protocol's result message."""
    layers = layer_table(original, result, steps)
    measured = result_metrics(original, result, layers, steps, job.outputs)
    job.channel.progress("report", 0.0, "writing report.json")
    engine_seconds = round(time.perf_counter() - job.started, 4)
    # Informational: the supervisor checks the guard again from the metrics and decides the job's status.
    guard = check_guard(job.recipe.guard, measured)
    recipe_json = job.recipe.model_dump(mode="json")
    recipe_hash = hashlib.sha256(json.dumps(recipe_json, sort_keys=True).encode()).hexdigest()
    env = environment(job.threads, job.timing_threads)
    model_ref = job.spec["model"]
    # The job object carries what explains a difference between reruns, not only report.json.
    measured["run"] = {"recipe_hash": recipe_hash, "model_sha256": model_ref.get("sha256"), "device": job.device,
                       "environment": env, "timings": job.timings, "step_seconds": [r.get("seconds") for r in steps]}
    _render_png(job, measured, layers, artifacts)
    report = Report.model_validate(_json_data({
        "schema_version": REPORT_SCHEMA_VERSION, "job_id": job.spec.get("job_id"), "device": job.device,
        "model": {"format": job.in_format, "path": model_ref["path"], "sha256": model_ref.get("sha256")},
        "recipe": recipe_json, "recipe_hash": recipe_hash, "guard": guard, "outputs": job.outputs,
        "metrics": measured, "steps": steps, "layers": layers, "timings": job.timings,
        "engine_seconds": engine_seconds, "notes": job.notes, "environment": env}))
    (job.out_dir / "report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2, allow_nan=False),
                                             encoding="utf-8")
    artifacts.append({"name": "report.json", "format": "json", "path": "report.json"})
    job.channel.progress("report", 1.0, "done")
    return {"type": "result", "metrics": measured, "artifacts": artifacts, "engine_seconds": engine_seconds}


def _json_data(value: dict[str, Any]) -> dict[str, Any]:
    """As report.json holds it: NaN/inf as null, what JSON cannot spell (a numpy scalar, a path) as its str()."""
    return json.loads(json.dumps(finite(value), allow_nan=False, default=str))


def _render_png(job: JobContext, measured: dict, layers: list[dict], artifacts: list[dict]) -> None:
    try:
        from worker.engine.report_plot import render

        png, _ = render(measured, layers, f"{job.spec.get('job_id') or 'job'}: {job.in_format} -> "
                                          f"{', '.join(job.outputs)}")
        (job.out_dir / "report.png").write_bytes(png)
        artifacts.append({"name": "report.png", "format": "png", "path": "report.png"})
    except Exception as exc:  # a picture must never fail a job whose numbers are measured
        job.notes.append(f"report.png not rendered: {type(exc).__name__}: {exc}")
