"""The evaluate_original stage: the evaluation inputs chosen and the original measured on them.

Runtimes both the original and the result run on are timed once, alternately, after the steps
(measure_result.py, metrics.latency_pair); here only the others are timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.recipes import NATIVE_RUNTIME
from worker.engine import metrics
from worker.engine.datasets import Dataset, arrange, synthetic_inputs
from worker.engine.errors import EngineError, blame
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel
from worker.engine.job.context import JobContext
from worker.engine.job.load import Loaded
from worker.engine.job.measure import measure


@dataclass
class Original:
    data: Dataset | None  # the eval dataset, if the job has one
    inputs: list[np.ndarray]  # what both models are measured on
    labels: np.ndarray | None
    examples: list[np.ndarray]  # example inputs for exporting
    stats: dict[str, Any]  # the original as measured (metrics' "original")
    reference: Any  # its outputs on `inputs`
    original_onnx: LoadedModel | None  # a torch original's fp32 ONNX export, timed on the ONNX runtimes
    paired: list[str]  # runtimes timed alternately with the result
    wanted: list[str]  # runtimes the result is timed on
    runnable_outputs: list[str]  # the outputs that run (all but safetensors)
    layers_before: dict[str, Any]
    tokens: np.ndarray | None = None  # a causal LM's: what every model is scored on (job/measure_llm.py)


def measure_original(job: JobContext, loaded: Loaded) -> Original:
    import torch

    model, fmt, ev = loaded.model, job.fmt, job.ev
    with job.stage("evaluate_original", "measuring the original model"):
        data = loaded.datasets.get(ev.dataset)
        inputs, labels = _eval_inputs(job, model, data)
        examples = fmt.example_inputs(model) or [a[:2] for a in inputs]
        original_runtimes, wanted, runnable_outputs, result_rts = _runtimes(job)
        # A torch original is timed on the ONNX runtimes as its own fp32 ONNX export: int8 ONNX against fp32 ONNX.
        onnx_format = get_format("onnx")
        onnx_rts = [rt for rt in original_runtimes if rt in onnx_format.runtimes and rt not in fmt.runtimes]
        original_onnx = _as_onnx(job, model, examples, onnx_rts) if onnx_rts else None
        original_rts = set(fmt.runtimes) | (set(onnx_rts) if original_onnx is not None else set())
        paired = sorted(set(original_runtimes) & original_rts & set(wanted) & result_rts)
        stats, reference = measure(model, loaded.model_path, ev, original_runtimes, inputs, labels,
                                   job.timing_threads, "original", blame_code="bad_model", notes=job.notes,
                                   skip_latency=paired)
        for rt in onnx_rts if original_onnx is not None else ():
            if rt in paired:
                continue
            with blame("bad_model", "the original's ONNX export failed to run"):
                stats["latency_ms"][rt] = metrics.latency(
                    onnx_format.runner(original_onnx, rt, job.timing_threads), inputs, ev.batch_sizes,
                    ev.warmup, ev.repeats, onnx_format.fixed_batch(original_onnx), job.notes,
                    f"original (fp32 ONNX export) on {rt}")
        layers_before = metrics.layer_sparsity(model)
        torch.set_num_threads(job.threads)  # a torch runner set the timing threads; the steps get them all
    return Original(data=data, inputs=inputs, labels=labels, examples=examples, stats=stats, reference=reference,
                    original_onnx=original_onnx, paired=paired, wanted=wanted, runnable_outputs=runnable_outputs,
                    layers_before=layers_before)


def _eval_inputs(job: JobContext, model: LoadedModel, data: Dataset | None):
    """(inputs, labels): the eval dataset's, else random inputs of the model's shapes (no labels)."""
    ev, fmt = job.ev, job.fmt
    specs = fmt.input_specs(model)
    if data is not None:
        inputs = [a[: ev.max_samples] for a in arrange(data, specs)]
        return inputs, None if data.labels is None else data.labels[: ev.max_samples]
    inputs = synthetic_inputs(specs, fmt.example_inputs(model), max(ev.batch_sizes))
    if inputs is None and hasattr(fmt, "default_inputs"):  # a Hugging Face model: input_ids shaped from its config
        inputs = fmt.default_inputs(model, max(ev.batch_sizes))
        job.notes.append(f"no {ev.dataset!r} dataset: timed on random input_ids of shape (batch, "
                         f"{inputs[0].shape[1]}) from the model's config; accuracy and agreement are not measured")
        return inputs, None
    if inputs is None:
        raise EngineError("bad_dataset", f"no {ev.dataset!r} dataset was given and the model's input "
                                         "shapes are unknown: upload an eval dataset (or, for a package, "
                                         "example_inputs.safetensors)")
    job.notes.append(f"no {ev.dataset!r} dataset: accuracy and agreement are not measured; latency "
                     "and output similarity use random inputs of the model's shapes")
    return inputs, None


def _runtimes(job: JobContext) -> tuple[list[str], list[str], list[str], set[str]]:
    """(runtimes the original is timed on, runtimes the result is timed on, outputs that run, runtimes the
    first of those can run on)."""
    ev, in_format = job.ev, job.in_format
    original_runtimes = ev.runtimes or [NATIVE_RUNTIME[in_format]]
    runnable_outputs = [o for o in job.outputs if o != "safetensors"]
    result_format = get_format((runnable_outputs or [in_format])[0])
    # Every output is timed in its own runtime: an ONNX output on onnxruntime even when the input is .pt2.
    wanted = ev.runtimes or list(dict.fromkeys(NATIVE_RUNTIME[o] for o in runnable_outputs or [in_format]))
    if not ev.runtimes and "onnxruntime" in wanted and "onnxruntime" not in original_runtimes:
        original_runtimes = [*original_runtimes, "onnxruntime"]  # so an ONNX result has a baseline
    return original_runtimes, wanted, runnable_outputs, set(result_format.runtimes)


def _as_onnx(job: JobContext, model: LoadedModel, examples, runtimes: list[str]) -> LoadedModel | None:
    """The original exported to fp32 ONNX and loaded (for timing on the ONNX `runtimes`), or None with a note."""
    path = job.work / "original-fp32.onnx"
    where = " and ".join(runtimes)
    try:
        job.fmt.export(model, "onnx", path, examples)
        loaded = get_format("onnx").load(path, job.work)
    except Exception as exc:  # noqa: BLE001  (a missing baseline must not fail the job)
        job.notes.append(f"original on {where}: not measured, its ONNX export failed ({type(exc).__name__})")
        return None
    job.notes.append(f"original on {where}: timed as its fp32 ONNX export")
    return loaded
