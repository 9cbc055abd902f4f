"""A causal LM measured before and after the steps, for the job's report (its `llm` section, docs/llm.md).

Replaces the evaluate_original and evaluate_result stages when the input is a Hugging Face causal LM: a logits
tensor per sample (sequence x vocabulary) is not something to keep for every eval sample, so the original keeps
only its next-token predictions. Each written output is reloaded from disk in the runtime it targets (the
compressed-tensors folder by transformers, GGUF by transformers' GGUF loader) and scored on the same text:
perplexity, next-token agreement with the original, generation speed; the first is also timed alternately with
the original on a window of `text.seq_len` tokens (prefill latency, the report's latency_ms).
"""

from __future__ import annotations

import gc
import resource
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from worker.engine import metrics
from worker.engine.datasets import Dataset
from worker.engine.errors import blame
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel
from worker.engine.job.context import JobContext
from worker.engine.job.load import Loaded
from worker.engine.job.measure_original import Original
from worker.engine.job.measure_result import Result
from worker.engine.llm.evaluate import (
    Perplexity,
    agreement,
    generation_pair,
    generation_speed,
    perplexity,
)
from worker.engine.text import TextDataset

# How each output is reloaded to be measured, as the report names it.
RUNTIME_NAMES = {"hf": "transformers", "gguf": "transformers GGUF loader (dequantized to float)"}
PROMPT_TOKENS = 128


def _stream(job: JobContext, model: LoadedModel, data: Dataset | None) -> tuple[np.ndarray, bool]:
    """(the tokens the models are scored on, whether they are real text)."""
    if isinstance(data, TextDataset):
        return data.stream, True
    if data is not None:
        return np.ascontiguousarray(next(iter(data.inputs.values()))).reshape(-1).astype(np.int64), True
    fmt = get_format(model.format)
    n = max(job.recipe.text.eval_tokens, job.recipe.text.seq_len * max(job.ev.batch_sizes))
    job.notes.append(f"no {job.ev.dataset!r} text: perplexity is not measured; agreement and speed use random "
                     f"token ids ({n:,})")
    return fmt.default_inputs(model, 1, n)[0].reshape(-1), False


def _windows(stream: np.ndarray, seq_len: int, batch: int) -> list[np.ndarray]:
    """Timing input: `batch` windows of seq_len (repeated when the text is short)."""
    seq_len = min(seq_len, len(stream))
    n = max(1, len(stream) // seq_len)
    rows = stream[: n * seq_len].reshape(n, seq_len)
    return [rows[np.arange(batch) % n]]


def _score(job: JobContext, module, stream: np.ndarray, real: bool, label: str, speed: bool = True
           ) -> tuple[Perplexity, dict]:
    """Perplexity (and, with `speed`, generation speed alone: the original and the first output are timed
    side by side instead, in _first_side)."""
    text = job.recipe.text
    with blame("bad_model", f"the {label} failed to run on the eval text"):
        ppl = perplexity(module, stream, text.seq_len, text.stride, text.eval_tokens)
        timed = generation_speed(module, stream[:PROMPT_TOKENS], text.generate_tokens) if speed else {}
    summary = {**ppl.summary(), **timed}
    if not real:
        summary["perplexity"] = summary["next_token_accuracy"] = None
    return ppl, summary


def measure_original_llm(job: JobContext, loaded: Loaded) -> Original:
    model = loaded.model
    with job.stage("evaluate_original", "scoring the original LM on the eval text"):
        data = loaded.datasets.get(job.ev.dataset)
        stream, real = _stream(job, model, data)
        stats = metrics.model_stats(model, loaded.model_path)
        ppl, summary = _score(job, model.handle, stream, real, "original model", speed=False)
        stats.update(latency_ms={}, accuracy=summary["next_token_accuracy"], macs=None)
        inputs = _windows(stream, job.recipe.text.seq_len, max(job.ev.batch_sizes))
        outputs = [o for o in job.outputs if o != "safetensors"]
    original = Original(data=data, inputs=inputs, labels=None, examples=[inputs[0][:2]], stats=stats,
                        reference=ppl, original_onnx=None, paired=["torch"], wanted=["torch"],
                        runnable_outputs=outputs, layers_before=metrics.layer_sparsity(model), tokens=stream)
    original.stats["llm"] = {**summary, "runtime": "torch", "real_text": real}
    return original


def measure_result_llm(job: JobContext, loaded: Loaded, original: Original, artifacts: list[dict]) -> Result:
    with job.stage("evaluate_result", "scoring each output, reloaded from disk"):
        _release(loaded)
        sizes = {a["format"]: (job.out_dir / a["path"]).stat().st_size for a in artifacts}
        scored: dict[str, dict[str, Any]] = {}
        compressed = layers_after = None
        for art in artifacts:
            if art["format"] not in RUNTIME_NAMES:
                job.notes.append(f"{art['name']}: not scored on the text (an LM is scored as a Hugging Face folder "
                                 "or GGUF); its size is reported")
                continue
            model = _reload(job, art)
            ppl, summary = _score(job, model.handle, original.tokens, _real(original),
                                  f"result ({art['name']})", speed=compressed is not None)
            summary.update(runtime=RUNTIME_NAMES[art["format"]], size_bytes=sizes[art["format"]],
                           agreement=agreement(original.reference, ppl))
            scored[art["format"]] = summary
            if compressed is None:
                compressed = _first_side(job, loaded, original, model, art, summary)
                layers_after = metrics.layer_sparsity(model)
        if compressed is None:
            _nothing_scored(artifacts)
        compressed["output_sizes"] = sizes
        llm = _section(job, original, scored)
    return Result(stats=compressed, layers_after=layers_after, compact=None, llm=llm)


def _release(loaded: Loaded) -> None:
    """Each output is scored from its reloaded file: the in-memory result is not used again (only its config is),
    and freeing it keeps this stage at the reloaded output plus the original timed beside it, not three models.
    llm-compressor's session holds the model too: it is reset (the outputs are written by now)."""
    if loaded.model.extra.get("llmc"):
        from llmcompressor.core import reset_session

        reset_session()
    loaded.model.handle = SimpleNamespace(config=loaded.model.handle.config)
    gc.collect()


def _real(original: Original) -> bool:
    return bool(original.stats["llm"]["real_text"])


def _reload(job: JobContext, art: dict) -> LoadedModel:
    path = job.out_dir / art["path"]
    if art["format"] == "gguf":
        from worker.engine.llm.gguf_io import load_gguf

        with blame("bad_model", "the GGUF output does not load back"):
            module = load_gguf(path)
        return LoadedModel(format="hf", path=path, handle=module, extra={"causal_lm": True})
    return get_format("hf").load(path, job.work)


def _first_side(job: JobContext, loaded: Loaded, original: Original, model: LoadedModel, art: dict,
                summary: dict) -> dict[str, Any]:
    """The first output as the report's result: its stats, and its prefill latency timed alternately with the
    original's on the same windows."""
    ev, threads = job.ev, job.timing_threads
    stats = metrics.model_stats(model, job.out_dir / art["path"])
    stats["format"] = art["format"]
    fmt = get_format("hf")
    # Timed as served: the original in its checkpoint's dtype, as the reloaded output computes in it (and a
    # 16-bit copy beside the output keeps this stage's memory near one float32 model).
    served = _served_dtype(loaded.model, model)
    original_again = fmt.load(loaded.model_path, job.work, dtype=served)
    if served != torch.float32:
        job.notes.append(f"original and result timed side by side in {str(served).removeprefix('torch.')}, the "
                         "checkpoint's dtype (as served); perplexity of the original in float32")
    original.stats["latency_ms"]["torch"], latency = metrics.latency_pair(
        fmt.runner(original_again, "torch", threads), fmt.runner(model, "torch", threads), original.inputs,
        ev.batch_sizes, ev.warmup, ev.repeats, None, job.notes, "original and result on torch")
    stats.update(latency_ms={"torch": latency}, accuracy=summary["next_token_accuracy"], macs=None,
                 agreement=summary["agreement"], cosine=None, max_abs_error=None)
    # Generation speed of the original and this output again, alternated: the figures compared side by side.
    text = job.recipe.text
    before, after = generation_pair([original_again.handle, model.handle], original.tokens[:PROMPT_TOKENS],
                                    text.generate_tokens)
    original.stats["llm"].update(before)
    summary.update(after, paired_with_original=True)
    return stats


def _served_dtype(original: LoadedModel, result: LoadedModel) -> torch.dtype:
    """The original's checkpoint dtype when it is 16-bit and the reloaded output computes in it too, else float32."""
    dtype = original.extra.get("checkpoint_dtype")
    result_dtype = next(result.handle.parameters()).dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) and result_dtype == dtype else torch.float32


def _nothing_scored(artifacts: list[dict]) -> None:
    from worker.engine.errors import EngineError

    raise EngineError("unsupported", f"no output of this causal LM can be scored ({[a['format'] for a in artifacts]}):"
                                     " add hf (a Hugging Face folder) or gguf to outputs")


def _section(job: JobContext, original: Original, scored: dict[str, dict]) -> dict[str, Any]:
    """The report's `llm` section (docs/llm.md)."""
    before = original.stats.pop("llm")
    base = before.get("perplexity")
    increases = [s["perplexity"] / base - 1 for s in scored.values() if base and s.get("perplexity") is not None]
    text = job.recipe.text
    return {
        "eval": {"dataset": job.ev.dataset if before["real_text"] else None, "tokens": before["tokens"],
                 "windows": before["windows"], "seq_len": before["seq_len"], "stride": before["stride"]},
        "original": {k: v for k, v in before.items() if k != "real_text"},
        "outputs": scored,
        "perplexity_increase": round(max(increases), 6) if increases else None,
        "generation": {"prompt_tokens": min(PROMPT_TOKENS, before["prompt_tokens"]),
                       "new_tokens": text.generate_tokens, "batch": 1, "threads": job.timing_threads},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "notes": [("perplexity: exp of the mean next-token loss on the eval text's first "
                   f"{before['tokens']:,} scored tokens; next_token_accuracy: top-1 on the same tokens"),
                  "tokens/s: greedy decoding at batch 1 with the KV cache, in the runtime named"],
    }
