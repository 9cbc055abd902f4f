"""The evaluate_result stage: each written output re-loaded from disk and measured.

A safetensors artifact runs as the input model with its weights: measured as the result only when it is the only
output, else reported as an extra size (safetensors_size_bytes). The first artifact measured gives the result's
outputs (fidelity) and layers; later ones add latency on the runtimes not yet timed (an ONNX output on
onnxruntime). Every output's size is in `output_sizes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.engine import metrics
from worker.engine.compact import load_compact, restore_into
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, ModelFormat
from worker.engine.job.context import JobContext
from worker.engine.job.load import Loaded
from worker.engine.job.measure import measure
from worker.engine.job.measure_original import Original


@dataclass
class Result:
    stats: dict[str, Any]  # the result as measured (metrics' "compressed")
    layers_after: dict[str, Any]
    compact: dict | None  # the safetensors artifact, if written
    llm: dict[str, Any] | None = None  # a causal LM's perplexity and generation speed (worker/engine/job/measure_llm.py)


def measure_result(job: JobContext, loaded: Loaded, original: Original, artifacts: list[dict]) -> Result:
    with job.stage("evaluate_result", "measuring the result re-loaded from disk"):
        compact = next((a for a in artifacts if a["format"] == "safetensors"), None)
        compressed: dict[str, Any] | None = None
        result_outputs = first_model = None
        for art in artifacts:
            if art["format"] == "safetensors" and original.runnable_outputs:
                continue
            afmt = get_format(job.in_format if art["format"] == "safetensors" else art["format"])
            runtimes = [rt for rt in original.wanted if rt in afmt.runtimes and rt not in original.paired]
            if compressed is not None:
                runtimes = [rt for rt in runtimes if rt not in compressed["latency_ms"]]
                if not runtimes:
                    continue
            model = _reload(job, loaded, afmt, art)
            side, outs = measure(model, job.out_dir / art["path"], job.ev, runtimes, original.inputs,
                                 original.labels, job.timing_threads, f"result ({art['name']})", blame_code=None,
                                 notes=job.notes)
            if compressed is None:
                if original.paired:
                    _time_pairs(job, loaded, original, afmt, model, side)
                compressed, result_outputs, first_model = side, outs, model
            else:
                compressed["latency_ms"].update(side["latency_ms"])
        fid = metrics.fidelity(original.reference, result_outputs)
        if original.data is None:
            fid["agreement"] = None
        compressed.update(fid)
        layers_after = metrics.layer_sparsity(first_model)
        # Every output's size, measured whether or not it ran: the headline size ratio is the best of them.
        compressed["output_sizes"] = {a["format"]: (job.out_dir / a["path"]).stat().st_size for a in artifacts}
        if compact is not None:
            compressed["safetensors_size_bytes"] = compressed["output_sizes"]["safetensors"]
            if not original.runnable_outputs:
                compressed["format"] = "safetensors"
    return Result(stats=compressed, layers_after=layers_after, compact=compact)


def _reload(job: JobContext, loaded: Loaded, afmt: ModelFormat, art: dict) -> LoadedModel:
    if art["format"] == "safetensors":
        model = afmt.load(loaded.model_path, job.work)  # the original again, with the stored weights put in
        restore_into(model, load_compact(job.out_dir / art["path"]))
        return model
    return afmt.load(job.out_dir / art["path"], job.work)


def _time_pairs(job: JobContext, loaded: Loaded, original: Original, afmt: ModelFormat, result: LoadedModel,
                side: dict[str, Any]) -> None:
    """Original and result timed alternately on the runtimes both run on, so a load change during the job hits
    both alike."""
    fmt, ev, threads = job.fmt, job.ev, job.timing_threads
    original_again = fmt.load(loaded.model_path, job.work)
    for rt in original.paired:
        run_original = fmt.runner(original_again, rt, threads) if rt in fmt.runtimes \
            else get_format("onnx").runner(original.original_onnx, rt, threads)
        original.stats["latency_ms"][rt], side["latency_ms"][rt] = metrics.latency_pair(
            run_original, afmt.runner(result, rt, threads), original.inputs, ev.batch_sizes, ev.warmup,
            ev.repeats, fmt.fixed_batch(original_again), job.notes, f"original and result on {rt}")
