"""LLM benchmark: SmolLM2-135M-Instruct compressed by Squeeze's LLM steps, scored on pydoc text.

Each row is one Squeeze job: the sandboxed engine's job (`worker.engine.job.run_job`) run in-process, without the
queue, the API or the sandbox, on a job folder laid out as the worker lays it out (job.json + inputs/). Each row
runs in a fresh Python subprocess (`python -c` calling `run_row` here), so that its peak RSS is its own: the
figure is the report's metrics.llm.peak_rss_mb, which is the whole job process's high-water mark (model loads,
calibration, export and every reload), not the compression step's alone.

    python -m bench.run llm          # every row (about an hour on 2 cores), results/llm.json + RESULTS.md
    python -m bench.llm ROW ...      # those rows again, merged into results/llm.json + RESULTS.md

The model is the bf16 folder `testing.llm_assets.smollm2_folder()` builds (cached in ~/.cache/squeeze-llm); its
weights came from a Q4_1 GGUF, so quantization deltas here are smaller than on the true bf16 SmolLM2.
Calibration and eval text are disjoint slices of Python's pydoc topics (`testing.llm_assets.text_split`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Same windows for every row: 256 tokens; perplexity on the eval text's first 2048 tokens; 32 calibration windows.
TEXT = {"seq_len": 256, "eval_tokens": 2048}
SAMPLES = 32
CALIBRATION_CHARS, EVAL_CHARS = 150_000, 30_000  # about 35k and 7k tokens: enough for 32 x 256 and 2048
THREADS = 2
ROW_TIMEOUT_S = 3600


def _quantize(method: str, algorithm: str, group_size: int | None, calibrating: bool) -> dict:
    step = {"type": "quantize", "method": method, "algorithm": algorithm, "dataset": "calibration"}
    if group_size is not None:
        step["group_size"] = group_size
    if calibrating:
        step["samples"] = SAMPLES
    return step


# row name -> recipe (text and evaluate added by _recipe)
ROWS: dict[str, dict] = {
    "rtn_w4a16_g64": {"steps": [_quantize("weight_int4", "rtn", 64, False)], "outputs": ["hf"]},
    "gptq_w4a16_g64": {"steps": [_quantize("weight_int4", "gptq", 64, True)], "outputs": ["hf"]},
    "magnitude_50": {"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "layer"}],
                     "outputs": ["hf"]},
    "sparsegpt_50": {"steps": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "samples": SAMPLES,
                                "dataset": "calibration"}], "outputs": ["hf"]},
    "gguf_q8_0": {"steps": [_quantize("weight_int8", "rtn", None, False)], "outputs": ["gguf"], "gguf_type": "q8_0"},
    "gguf_q4_0": {"steps": [_quantize("weight_int4", "rtn", 32, False)], "outputs": ["gguf"], "gguf_type": "q4_0"},
    "awq_w4a16_g64": {"steps": [_quantize("weight_int4", "awq", 64, True)], "outputs": ["hf"]},
    "w8a8_smoothquant": {"steps": [{"type": "quantize", "method": "w8a8", "samples": SAMPLES,
                                    "dataset": "calibration"}], "outputs": ["hf"]},
}
# (row, baseline row, key stored on the row): the row's perplexity increase over the baseline's
RELATIVE = (("gptq_w4a16_g64", "rtn_w4a16_g64", "gptq_vs_rtn"), ("awq_w4a16_g64", "rtn_w4a16_g64", "awq_vs_rtn"),
            ("sparsegpt_50", "magnitude_50", "sparsegpt_vs_magnitude"))


class _Quiet:
    """A protocol channel that drops every message: the in-process run has no worker listening."""

    def send(self, message: dict[str, Any]) -> None:
        pass

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        pass


def bench_llm(work: Path, rows: list[str] | None = None) -> dict[str, dict]:
    """Every row of ROWS (or `rows`), each in its own subprocess; one dict of figures per row, failures recorded
    with status and error. Rows compared to a baseline (RELATIVE) get the ratio of perplexity increases."""
    inputs = prepare_inputs(work / "inputs")
    results: dict[str, dict] = {}
    for name in rows or list(ROWS):
        results[name] = _row_in_subprocess(name, work, inputs)
        print(f"[bench.llm] {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    _relative(results)
    return results


def prepare_inputs(folder: Path) -> dict[str, str]:
    """The zipped bf16 model and the two text files every job links to; paths by role, plus the bf16 size."""
    from testing.llm_assets import smollm2_folder, text_split, zip_folder

    folder.mkdir(parents=True, exist_ok=True)
    model = smollm2_folder()
    calibration, evaluation = text_split(CALIBRATION_CHARS, EVAL_CHARS)
    (folder / "calibration.txt").write_text(calibration, encoding="utf-8")
    (folder / "eval.txt").write_text(evaluation, encoding="utf-8")
    return {"model": str(zip_folder(model, folder / "model.zip")), "calibration": str(folder / "calibration.txt"),
            "eval": str(folder / "eval.txt"), "bf16_bytes": str((model / "model.safetensors").stat().st_size)}


def _row_in_subprocess(name: str, work: Path, inputs: dict[str, str]) -> dict:
    """run_row(name, ...) in a fresh interpreter; its figures are read from the JSON file it writes."""
    out = work / f"{name}.result.json"
    code = ("import json, sys; from pathlib import Path; from bench.llm import run_row; "
            "run_row(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))")
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, name, str(work), json.dumps(inputs)],
                              cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                              timeout=ROW_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {ROW_TIMEOUT_S} s"}
    if out.is_file():
        figures = json.loads(out.read_text())
        if figures["status"] != "succeeded":  # the row keeps the message; the traceback goes to this stderr
            print(proc.stderr[-4000:], file=sys.stderr, flush=True)
        return figures
    return {"status": "failed", "error": f"exit {proc.returncode} after {time.perf_counter() - started:.0f} s: "
                                         f"{proc.stderr[-1500:]}"}


def run_row(name: str, work: Path, inputs: dict[str, str]) -> dict:
    """One row's job run in this process; its figures written to work/<name>.result.json and returned."""
    import torch

    torch.set_num_threads(THREADS)
    commit = _commit()
    started = time.perf_counter()
    try:
        figures = _figures(_run_job(name, work / name, inputs), int(inputs["bf16_bytes"]))
    except Exception as exc:  # noqa: BLE001 - a failed row is recorded, never dropped
        code = getattr(exc, "code", type(exc).__name__)
        traceback.print_exc()  # the whole of it on this row's stderr; the row keeps the message
        figures = {"status": "failed", "error": f"{code}: {getattr(exc, 'message', exc)}"[:400]}
    figures["job_seconds"] = round(time.perf_counter() - started, 1)
    figures["commit"] = commit
    if figures.get("peak_rss_mb") is None:  # a failed job has no report: this process's own high-water mark
        figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (work / f"{name}.result.json").write_text(json.dumps(figures, indent=2))
    return figures


def _commit() -> str:
    """The checkout's commit this row ran at (short hash, "+dirty" when tracked files differ): the engine changes
    under a long benchmark, and rows run at different commits are not comparable."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "worker", "app"],
                           capture_output=True, text=True, check=False)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _run_job(name: str, job: Path, inputs: dict[str, str]) -> dict:
    """The job folder for row `name` (inputs hard-linked), run by the engine; returns report.json."""
    from worker.engine.job import run_job

    (job / "inputs").mkdir(parents=True)
    rel = {}
    for role, src in (("model", inputs["model"]), ("calibration", inputs["calibration"]), ("eval", inputs["eval"])):
        dest = job / "inputs" / Path(src).name
        os.link(src, dest)
        rel[role] = f"inputs/{dest.name}"
    recipe = {**ROWS[name], "text": TEXT}
    spec = {"job_id": f"bench-llm-{name}", "model": {"path": rel.pop("model"), "format": "hf"}, "recipe": recipe,
            "outputs": recipe["outputs"], "datasets": rel, "threads": THREADS}
    (job / "job.json").write_text(json.dumps(spec))
    run_job(job, _Quiet())
    return json.loads((job / "out" / "report.json").read_text())


def _figures(report: dict, bf16_bytes: int) -> dict:
    """The row's figures from a job's report: perplexity, size against the bf16 safetensors, speed, peak RSS."""
    llm = report["metrics"]["llm"]
    fmt, scored = next(iter(llm["outputs"].items()))
    before, ppl = llm["original"]["perplexity"], scored["perplexity"]
    return {"status": "succeeded", "output": fmt, "perplexity_original": before, "perplexity_result": ppl,
            "perplexity_increase": round(ppl / before - 1, 4), "agreement": scored.get("agreement"),
            "size_bytes": scored["size_bytes"], "size_ratio_vs_bf16": round(scored["size_bytes"] / bf16_bytes, 4),
            "bf16_safetensors_bytes": bf16_bytes,
            "decode_tok_s_original": llm["original"].get("decode_tokens_per_s"),
            "decode_tok_s_result": scored.get("decode_tokens_per_s"),
            "prefill_tok_s_original": llm["original"].get("prefill_tokens_per_s"),
            "prefill_tok_s_result": scored.get("prefill_tokens_per_s"),
            "engine_seconds": report.get("engine_seconds") or report["metrics"].get("engine_seconds"),
            "peak_rss_mb": llm.get("peak_rss_mb")}


def _relative(results: dict[str, dict]) -> None:
    """Store each compared row's perplexity increase as a multiple of its baseline's (0.5 = half of it)."""
    for row, base, key in RELATIVE:
        mine, theirs = results.get(row, {}), results.get(base, {})
        if mine.get("status") == "succeeded" and theirs.get("status") == "succeeded" \
                and theirs["perplexity_increase"] > 0:
            mine[key] = round(mine["perplexity_increase"] / theirs["perplexity_increase"], 4)


def merge(rows: dict[str, dict], command: str) -> Path:
    """Rows run on their own (`python -m bench.llm ROW ...`) merged into bench/results/llm.json (the other rows
    kept, the baselines' ratios computed again) and bench/RESULTS.md rendered again: a row can be rerun without
    the hour the whole suite takes. The file's command names the rows that were rerun."""
    from bench.run import RESULTS, environment, hand_notes, render

    path = RESULTS / "llm.json"
    result = json.loads(path.read_text()) if path.is_file() else {"command": "python -m bench.run llm", "results": {}}
    merged = {name: result["results"].get(name, {"status": "not run"}) for name in ROWS}
    merged.update(rows)
    for figures in merged.values():
        for key in [k for k in figures if k.endswith(("_vs_rtn", "_vs_magnitude"))]:
            del figures[key]
    _relative(merged)
    result.update(results=merged, environment=environment(), command=command)
    if not result.get("seconds"):  # no whole-suite run to time: the rows' own job seconds, summed
        result["seconds"] = round(sum(f.get("job_seconds") or 0 for f in merged.values()), 1)
    path.write_text(json.dumps(result, indent=2) + "\n")
    everything = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    target = RESULTS.parent / "RESULTS.md"
    target.write_text(render(everything) + hand_notes(target))
    return path


if __name__ == "__main__":  # python -m bench.llm ROW ...: those rows run again and merged into the results
    import tempfile

    names = sys.argv[1:]
    if not names or set(names) - set(ROWS):
        sys.exit(f"usage: python -m bench.llm ROW ... (rows: {' '.join(ROWS)})")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as scratch:
        done = bench_llm(Path(scratch), names)
    print(merge(done, f"python -m bench.llm {' '.join(names)} ({round(time.time() - started, 1)} s; other rows "
                      "from the last full run)"))
