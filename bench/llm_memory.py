"""Peak memory of a GPTQ job on a random ~1.1B-parameter Llama (llm-compressor's sequential calibration).

The issue's target: a GPTQ job on a random 1B-parameter Llama config with peak sandbox RSS below 1.5x the model's
size. Three fresh subprocesses, so that each peak is its own (read with os.wait4: that child's ru_maxrss):

  build   a TinyLlama-shaped LlamaConfig (hidden 2048, 22 layers, 32 heads, 4 key/value heads, vocab 32000) built
          in bfloat16 with random weights, saved with the tiny pydoc tokenizer (ids < 1000: fine for calibration)
          and zipped as an upload;
  job     the engine's job (`worker.engine.job.run_job`) in-process on a job folder laid out as the worker lays it
          out: weight_int4 GPTQ g128, 8 calibration windows of 128 tokens, output hf, scored on 256 eval tokens;
  steps   the same GPTQ through `worker.engine.llm.llmc.apply_llmc` alone on the model as the job loads it.

GPTQ's column loop takes about 2.5 min per decoder layer of the 1B model on 2 shared cores, so the step quantizes
the first QUANTIZED_LAYERS decoder layers only (targets model.layers.0.* ...): calibration still runs sequentially
through all 22 layers, every stage loads, holds, writes and reloads the whole 1.1B model, and GPTQ's working set
(Hessians, the fp32 copy of the weight being quantized) is per layer, the same for every layer; the time of a full
run is extrapolated from the measured seconds per quantized layer.

Inside the job and steps children a thread samples /proc/self/status (VmRSS, RssAnon, RssFile) every 50 ms and
books each sample to the stage the channel last announced, refined by named phases (the engine's functions are
wrapped for timing only: what they do is unchanged), so the report says where the peak is and what is resident.

    python -m bench.llm_memory [1b|0.5b|tiny] [--work DIR]   # writes bench/results/llm_memory.json (tiny: printed
                                                              # only); --work keeps the built model for a rerun
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
SEQ_LEN, SAMPLES, GROUP = 128, 8, 128
TEXT = {"seq_len": SEQ_LEN, "eval_tokens": 256, "generate_tokens": 4}
CALIBRATION_CHARS, EVAL_CHARS = 30_000, 12_000  # about 9k and 3.5k tokens of the tiny tokenizer: ample
CHILD_TIMEOUT_S = 4 * 3600
MIN_AVAILABLE = 3 * 2**30  # a child is killed when the host has less memory available than this
QUANTIZED_LAYERS = 2  # decoder layers GPTQ quantizes (None: all); see the module docstring
TARGET_RATIO = 1.5
# Llama shapes: "1b" is TinyLlama-1.1B's; "0.5b" the fallback when the 1B job is too slow on this host.
PRESETS: dict[str, dict[str, int]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 24,
             "num_key_value_heads": 4, "vocab_size": 32000},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000},
}


# ---------------------------------------------------------------------------------------------------------------
# sampling inside a child


class StageSampler:
    """Resident memory sampled every `every` s from /proc/self/status, each sample booked to the current
    (stage, phase): per key the peak VmRSS / RssAnon / RssFile (bytes), and when the stage or phase changed."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.stage, self.phase = "start", ""
        self.peaks: dict[str, dict[str, int]] = {}
        self.marks: list[dict[str, Any]] = []  # {t, stage, phase, message, VmHWM}
        self.layers: list[float] = []  # perf_counter when each "calibrating layer" message came
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in StageSampler.FIELDS:
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _book(self) -> None:
        now = self.read()
        with self._lock:
            key = f"{self.stage}/{self.phase}" if self.phase else self.stage
            peak = self.peaks.setdefault(key, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0})
            if now["VmRSS"] > peak["VmRSS"]:
                peak.update({k: now[k] for k in ("VmRSS", "RssAnon", "RssFile")})

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._book()

    def mark(self, stage: str | None = None, phase: str | None = None, message: str = "") -> None:
        self._book()  # the samples so far belong to the stage that is ending
        with self._lock:
            changed = (stage is not None and stage != self.stage) or (phase is not None and phase != self.phase)
            self.stage = self.stage if stage is None else stage
            self.phase = self.phase if phase is None else phase
            if changed:
                self.marks.append({"t": round(time.perf_counter() - self._started, 2), "stage": self.stage,
                                   "phase": self.phase, "message": message, "VmHWM": self.read()["VmHWM"]})
        if message.startswith("calibrating layer"):
            self.layers.append(time.perf_counter())

    @contextlib.contextmanager
    def phase_of(self, label: str):
        before = self.phase
        self.mark(phase=label)
        try:
            yield
        finally:
            self.mark(phase=before)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._book()

    def summary(self) -> dict[str, Any]:
        mib = {key: {k: round(v / 2**20, 1) for k, v in peak.items()} for key, peak in self.peaks.items()}
        gaps = [b - a for a, b in zip(self.layers, self.layers[1:])]
        return {"peak_mib_by_stage": mib, "marks": self.marks,
                "layer_seconds": [round(g, 2) for g in gaps],
                "vm_hwm_bytes": self.read()["VmHWM"]}


class _Channel:
    """The protocol channel of an in-process run: messages dropped, progress booked to the sampler."""

    def __init__(self, sampler: StageSampler) -> None:
        self.sampler = sampler

    def send(self, message: dict[str, Any]) -> None:
        pass

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self.sampler.mark(stage=stage, phase="" if stage != self.sampler.stage else None, message=message)


def _wrap(module: Any, name: str, sampler: StageSampler, label: str) -> None:
    """module.name replaced by a wrapper that books its run to phase `label` (timing only: same call, same result)."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with sampler.phase_of(label):
            return original(*args, **kwargs)

    setattr(module, name, wrapper)


def _instrument(sampler: StageSampler) -> None:
    """Name the parts of the steps, write and evaluate stages whose memory matters."""
    from worker.engine import metrics
    from worker.engine.formats import get_format
    from worker.engine.job import measure_llm
    from worker.engine.llm import compressed, llmc

    _wrap(llmc, "apply_llmc", sampler, "apply_llmc (llm-compressor oneshot)")
    _wrap(compressed, "save_compressed", sampler, "save_compressed")
    _wrap(measure_llm, "_reload", sampler, "reload the hf output")
    _wrap(measure_llm, "_score", sampler, "perplexity + generation")
    _wrap(measure_llm, "generation_pair", sampler, "generation pair (original again + result)")
    _wrap(metrics, "latency_pair", sampler, "latency pair (original again + result)")
    _wrap(metrics, "model_stats", sampler, "model_stats")
    fmt = get_format("hf")
    _wrap(fmt, "load", sampler, "hf load")


# ---------------------------------------------------------------------------------------------------------------
# children


def build_model(work: Path, preset: str) -> dict[str, Any]:
    """The random bf16 Llama folder (with the tiny tokenizer) and its zip; the text files."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from testing.llm_assets import save_tiny_tokenizer, text_split, zip_folder

    folder = work / "model"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_size = save_tiny_tokenizer(folder)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    calibration, evaluation = text_split(CALIBRATION_CHARS, EVAL_CHARS)
    (work / "calibration.txt").write_text(calibration, encoding="utf-8")
    (work / "eval.txt").write_text(evaluation, encoding="utf-8")
    zip_folder(folder, work / "model.zip")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"params": params, "bf16_safetensors_bytes": weights, "zip_bytes": (work / "model.zip").stat().st_size,
            "tokenizer_size": tokenizer_size, "config": PRESETS[preset]}


def _targets() -> list[str] | None:
    """The step's targets: the first QUANTIZED_LAYERS decoder layers' weights (fnmatch patterns), or all."""
    return None if QUANTIZED_LAYERS is None else [f"model.layers.{i}.*" for i in range(QUANTIZED_LAYERS)]


def _job_folder(work: Path) -> Path:
    job = work / "job"
    if job.exists():
        import shutil

        shutil.rmtree(job)
    (job / "inputs").mkdir(parents=True)
    for name in ("model.zip", "calibration.txt", "eval.txt"):
        os.link(work / name, job / "inputs" / name)
    step = {"type": "quantize", "method": "weight_int4", "algorithm": "gptq", "group_size": GROUP,
            "samples": SAMPLES, "dataset": "calibration"}
    if _targets():
        step["targets"] = _targets()
    recipe = {"steps": [step],
              "text": TEXT, "evaluate": {"repeats": 1, "warmup": 0}, "outputs": ["hf"]}
    spec = {"job_id": "bench-llm-memory", "model": {"path": "inputs/model.zip", "format": "hf"}, "recipe": recipe,
            "outputs": ["hf"], "datasets": {"calibration": "inputs/calibration.txt", "eval": "inputs/eval.txt"},
            "threads": THREADS}
    (job / "job.json").write_text(json.dumps(spec))
    return job


def run_job_child(work: Path) -> dict[str, Any]:
    """The whole Squeeze job in this process, sampled per stage; figures from its report.json."""
    from worker.engine.job import run_job

    job = _job_folder(work)
    with StageSampler() as sampler:
        _instrument(sampler)
        run_job(job, _Channel(sampler))
    report = json.loads((job / "out" / "report.json").read_text())
    llm, step = report["metrics"]["llm"], report["steps"][0]
    return {"timings_s": report.get("timings") or report["metrics"].get("timings"),
            "step_peak_rss_growth_mb": step.get("peak_rss_mb"), "layers_changed": step.get("layers_changed"),
            "perplexity_original": llm["original"]["perplexity"],
            "perplexity_result": llm["outputs"]["hf"]["perplexity"],
            "perplexity_increase": llm["perplexity_increase"], "report_peak_rss_mb": llm.get("peak_rss_mb"),
            "hf_output_bytes": llm["outputs"]["hf"]["size_bytes"], **sampler.summary()}


def run_steps_child(work: Path) -> dict[str, Any]:
    """The model loaded as the job loads it, calibration windows tokenized as the job does, then apply_llmc."""
    import llmcompressor  # noqa: F401 - imported before the baseline, as the job has it by its steps stage
    import torch

    from app.recipes.recipe import TextSpec
    from worker.engine.formats import get_format
    from worker.engine.llm.llmc import LlmcStep, apply_llmc
    from worker.engine.text import load_tokenizer, read_text, tokenize

    with StageSampler() as sampler:
        baseline = sampler.read()["VmRSS"]  # the interpreter with torch, transformers and llm-compressor
        sampler.mark(stage="load")
        model = get_format("hf").load(work / "model.zip", work / "steps-work")
        net = model.handle
        raw = read_text(work / "calibration.txt", "calibration")
        windows = tokenize(raw, load_tokenizer(model.extra["folder"]), TextSpec(**TEXT), None).inputs["input_ids"]
        tokens = torch.from_numpy(windows[:SAMPLES].copy())
        params = sum(p.numel() for p in net.parameters())
        in_memory = sum(p.numel() * p.element_size() for p in net.parameters())
        dtypes = sorted({str(p.dtype) for p in net.parameters()})
        rss_loaded = sampler.read()["VmRSS"]
        sampler.mark(stage="steps")
        targets = [f"re:^model\\.layers\\.{i}\\." for i in range(QUANTIZED_LAYERS)] if _targets() else ["Linear"]
        step = LlmcStep(kind="gptq", bits=4, group_size=GROUP, targets=targets, ignore=["lm_head"])
        report = apply_llmc(net, step, tokens, work / "steps-work" / "llmc", lambda f, m: sampler.mark(message=m))
        sampler.mark(stage="done")
    return {"params": params, "model_bytes_in_memory": in_memory, "dtypes": dtypes, "rss_baseline_bytes": baseline,
            "rss_after_load_bytes": rss_loaded,
            "apply_llmc_seconds": report["seconds"], "apply_llmc_peak_rss_growth_mb": report["peak_rss_mb"],
            "modules_changed": len(report["modules"]), **sampler.summary()}


CHILDREN = {"build": lambda work, preset: build_model(work, preset), "job": lambda work, preset: run_job_child(work),
            "steps": lambda work, preset: run_steps_child(work)}


def child_main(mode: str, work: str, preset: str) -> None:
    """Entry of a child: torch at THREADS threads, the figures written to work/<mode>.json."""
    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    figures = CHILDREN[mode](Path(work), preset)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    (Path(work) / f"{mode}.json").write_text(json.dumps(figures, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# the parent


def _mem_available() -> int:
    """The host's MemAvailable (bytes): a child that would push the shared host into swapping or the OOM killer
    is stopped first (MIN_AVAILABLE)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _child(mode: str, work: Path, preset: str) -> dict[str, Any]:
    """Run one child; its figures plus its own peak RSS (ru_maxrss from os.wait4: this child's alone)."""
    code = "import sys; from bench.llm_memory import child_main; child_main(*sys.argv[1:])"
    log = work / f"{mode}.log"
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, mode, str(work), preset], cwd=ROOT,
                                stdout=err, stderr=subprocess.STDOUT)
        deadline, why = started + CHILD_TIMEOUT_S, ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            available = _mem_available()
            if time.perf_counter() > deadline or available < MIN_AVAILABLE:
                why = (f"killed: the host had {available / 2**30:.2f} GiB available (other processes share it)"
                       if available < MIN_AVAILABLE else f"killed after {CHILD_TIMEOUT_S} s")
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.25)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = work / f"{mode}.json"
    figures = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else {
        "error": f"{why or 'exit ' + str(proc.returncode)} after {time.perf_counter() - started:.0f} s: "
                 f"{log.read_text()[-1500:]}"}
    figures["peak_rss_bytes"] = usage.ru_maxrss * 1024  # KiB on Linux
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"[bench.llm_memory] {mode}: {json.dumps(figures)[:600]}", file=sys.stderr, flush=True)
    return figures


def bench_llm_memory(work: Path, preset: str = "1b") -> dict[str, dict]:
    """Build the random Llama, run the job and the steps alone, each in its own process; one row of figures."""
    work.mkdir(parents=True, exist_ok=True)
    built = work / "build.json"  # a work folder built before (same preset) is reused: the build takes minutes
    reuse = built.is_file() and json.loads(built.read_text()).get("config") == PRESETS[preset]
    build = {**json.loads(built.read_text()), "wall_s": 0.0, "reused": True} if reuse else _child("build", work, preset)
    if "error" in build:
        return {_row_name(preset): {"status": "failed", "error": build["error"]}}
    steps = _child("steps", work, preset)
    job = _child("job", work, preset)
    return {_row_name(preset): _row(build, job, steps)}


def _row_name(preset: str) -> str:
    return f"gptq_{preset}_random_llama"


def _row(build: dict, job: dict, steps: dict) -> dict[str, Any]:
    params = build["params"]
    in_memory = steps.get("model_bytes_in_memory") or params * 4
    failed = [name for name, f in (("job", job), ("steps", steps)) if "error" in f]
    row: dict[str, Any] = {
        "status": "failed" if failed else "succeeded",
        "error": "; ".join(f"{name}: {(job if name == 'job' else steps)['error'][:600]}" for name in failed) or None,
        "params": params, "dtype_in_memory": "/".join(steps.get("dtypes") or ["unknown"]),
        "model_bytes_in_memory": in_memory, "bf16_safetensors_bytes": build["bf16_safetensors_bytes"],
        "fp32_bytes": params * 4,
        "peak_rss_bytes_job": job["peak_rss_bytes"], "peak_rss_bytes_steps_only": steps["peak_rss_bytes"],
        "ratio_job": round(job["peak_rss_bytes"] / in_memory, 3),
        "ratio_steps": round(steps["peak_rss_bytes"] / in_memory, 3),
        "ratio_job_vs_fp32": round(job["peak_rss_bytes"] / (params * 4), 3),
        "seconds": round(build["wall_s"] + job["wall_s"] + steps["wall_s"], 1),
        "job_seconds": job["wall_s"], "steps_only_seconds": steps["wall_s"], "build_seconds": build["wall_s"],
    }
    for key in ("timings_s", "step_peak_rss_growth_mb", "perplexity_original", "perplexity_result",
                "perplexity_increase", "hf_output_bytes", "layers_changed"):
        row[key] = job.get(key)
    row["rss_runtime_baseline_bytes"] = steps.get("rss_baseline_bytes")
    row["steps_only_rss_after_load_bytes"] = steps.get("rss_after_load_bytes")
    row["steps_only_apply_llmc_peak_growth_mb"] = steps.get("apply_llmc_peak_rss_growth_mb")
    row.update(_layer_times(job, build["config"]["num_hidden_layers"]))
    row["details"] = {"quantized_decoder_layers": QUANTIZED_LAYERS or build["config"]["num_hidden_layers"],
                      "steps_only_layer_seconds": steps.get("layer_seconds"), "job_layer_seconds": job.get("layer_seconds"),
                      "job_peak_mib_by_stage": job.get("peak_mib_by_stage"), "job_marks": job.get("marks"),
                      "steps_only_peak_mib_by_stage": steps.get("peak_mib_by_stage"),
                      "build": {k: build[k] for k in ("zip_bytes", "tokenizer_size", "config")},
                      "recipe": {"gptq_group_size": GROUP, "samples": SAMPLES, "text": TEXT, "threads": THREADS}}
    return row


def _layer_times(job: dict, layers: int) -> dict[str, Any]:
    """Seconds per decoder layer with GPTQ and without (calibration only), and a full GPTQ run extrapolated."""
    gaps = job.get("layer_seconds") or []  # gaps[i]: layer i+1 (0-based) from its start to the next layer's start
    quantized = QUANTIZED_LAYERS or layers
    with_gptq, without = gaps[:quantized], gaps[quantized:]
    per_q = sum(with_gptq) / len(with_gptq) if with_gptq else None
    per_plain = sum(without) / len(without) if without else None
    steps_s = (job.get("timings_s") or {}).get("steps")
    full = None
    if per_q is not None and steps_s is not None and quantized < layers:
        full = round(steps_s + (layers - quantized) * (per_q - (per_plain or 0)))
    return {"gptq_seconds_per_quantized_layer": round(per_q, 1) if per_q else None,
            "seconds_per_calibration_only_layer": round(per_plain, 1) if per_plain else None,
            "steps_seconds_all_layers_extrapolated": full}


def main(argv: list[str]) -> None:
    import tempfile

    from bench.run import RESULTS, environment

    keep = argv[argv.index("--work") + 1] if "--work" in argv else None  # a folder kept (and reused) between runs
    presets = [a for a in argv if a in PRESETS]
    preset = presets[0] if presets else "1b"
    with contextlib.ExitStack() as stack:
        work = keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-llm-memory-"))
        started = time.time()
        result = {"command": f"python -m bench.llm_memory {preset}", "environment": environment(),
                  "results": bench_llm_memory(Path(work), preset)}
        result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=2) + "\n"
    print(text)
    if preset != "tiny":
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "llm_memory.json").write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
