"""`make bench`: runs the benchmark suite and writes bench/results/*.json and bench/RESULTS.md.

    python -m bench.run [service ...]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import compression, fuzz, large, llm, llm_memory, load, scale, service

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = {
    "service": lambda work: {
        "upload_1gib": service.bench_upload(work),
        "submit_to_running": service.bench_submit_latency(work),
        "get_job": service.bench_get_job(work),
        "get_job_2_api_processes": service.bench_get_job(work, api_processes=2),
        "job_overhead_sqlite": service.bench_job_overhead(work, "sqlite"),
        "job_overhead_postgres_redis": service.bench_job_overhead(work, "postgres"),
    },
    "sandbox": lambda work: {
        "fresh_interpreter_imports": service.bench_fresh_imports(),
        "job_overhead_cold": service.bench_job_overhead(work, "sqlite"),
        "job_overhead_warm": service.bench_job_overhead(work, "sqlite", warm=True),
    },
    "compression": lambda work: compression.bench_compression(work),
    "scale": lambda work: scale.bench_scale(work),
    "fuzz": lambda work: fuzz.bench_fuzz(work),
    "large": lambda work: large.bench_large(work),
    "load": lambda work: load.bench_load(work),
    "llm": lambda work: llm.bench_llm(work),
    "llm_memory": lambda work: llm_memory.bench_llm_memory(work),
}


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_flags": _cpu_flags(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def _cpu_flags() -> str:
    """The SIMD features speed figures depend on (AVX2, AVX-512, VNNI, AMX), from /proc/cpuinfo."""
    from worker.engine.cpu import host_flags, int8_features

    return " ".join(int8_features(host_flags())) or "none of avx2/avx512/vnni/amx"


TARGETS = {  # the issues' targets, checked against the measured figures in RESULTS.md
    "gptq_1b_random_llama": ("GPTQ job on a random 1.1B Llama: peak RSS <= 1.5x the model in memory (float32)",
                             lambda r: r.get("status") == "succeeded" and r.get("ratio_job", 99) <= 1.5),
    "fuzz_openapi": ("every operation passes every check, >= 5000 generated cases",
                     lambda r: r["operations_failed"] == 0 and r["exit_code"] == 0 and r["cases"] >= 5000),
    "upload_1gib": ("median_mib_per_s >= 300 and max_rss_growth_mib <= 64",
                    lambda r: r["median_mib_per_s"] >= 300 and r["max_rss_growth_mib"] <= 64),
    "submit_to_running": ("p50_ms <= 100 on Redis", lambda r: r["p50_ms"] <= 100),
    "get_job": ("req_per_s >= 500", lambda r: r["req_per_s"] >= 500),
    "fleet_3_workers_30_jobs": ("every job succeeds, every worker runs some (no shared disk: blobs in S3)",
                                lambda r: r["succeeded"] == r["jobs"] and len(r["per_worker"]) == r["workers"]
                                and min(r["per_worker"].values()) > 0),
    "resnet_slim50_finetune3": ("macs_ratio >= 3.5, speed-up >= 2.5x at b32, accuracy drop <= 1 point",
                                lambda r: r.get("macs_ratio", 0) >= 3.5 and r.get("speedup_torch_b32", 0) >= 2.5
                                and r.get("accuracy_drop", 1) <= 0.01),
    "cnn_unstructured80_finetune3": ("safetensors >= 2.5x smaller than fp32, drop <= 1 point, flags no_speedup",
                                     lambda r: r.get("safetensors_size_ratio", 0) >= 2.5
                                     and r.get("accuracy_drop", 1) <= 0.01
                                     and "no_speedup" in r.get("flags", [])),
    "resnet_slim50_distill3": ("accuracy within 0.5 point of the original, >= 2.5x faster at b32",
                               lambda r: r.get("accuracy_drop", 1) <= 0.005 and r.get("speedup_torch_b32", 0) >= 2.5),
    "resnet_slim50_distill3_label_free": ("no labels: accuracy within 1 point, >= 2.5x faster at b32",
                                          lambda r: r.get("accuracy_drop", 1) <= 0.01
                                          and r.get("speedup_torch_b32", 0) >= 2.5),
    "cnn_int8_onnx": ("ONNX int8 >= 3.5x smaller, >= 2.5x faster at b32 than fp32 ONNX in ORT, drop <= 0.5 "
                      "point, agreement >= 99%", lambda r: _int8_met(r)),
    "resnet_int8_onnx": ("ONNX int8 >= 3.5x smaller, >= 2.5x faster at b32 than fp32 ONNX in ORT, drop <= 0.5 "
                         "point, agreement >= 99%", lambda r: _int8_met(r)),
    "cnn_int8_pt2_compiled": (".pt2 int8 loads and under torch.compile beats fp32 under torch.compile at b32",
                              lambda r: r.get("status") == "succeeded" and r.get("speedup_torch-compile_b32", 0) > 1),
    "resnet_int8_pt2_compiled": (".pt2 int8 loads and under torch.compile beats fp32 under torch.compile at b32",
                                 lambda r: r.get("status") == "succeeded"
                                 and r.get("speedup_torch-compile_b32", 0) > 1),
    "resnet_slim50_distill3_int8": ("prune 50% channels -> distill -> static int8 ONNX: >= 10x smaller, >= 6x faster "
                                    "at b32 than the fp32 original in eager PyTorch, drop <= 1 point",
                                    lambda r: r.get("size_ratio", 0) >= 10 and r.get("speedup_vs_eager_torch_b32", 0) >= 6
                                    and r.get("accuracy_drop", 1) <= 0.01),
    "bert_int8_dynamic": (">= 3x smaller on disk, agreement >= 98%",
                          lambda r: r.get("size_ratio", 0) >= 3 and r.get("agreement", 0) >= 0.98),
    "mlp_binary": (">= 20x smaller on disk (accuracy reported, whatever it is)",
                   lambda r: max(r.get("size_ratio") or 0, r.get("safetensors_size_ratio") or 0) >= 20),
    "bert_mlp_width50": ("structural pruning runs end to end, fewer MACs (the hf artifact reloads with "
                         "transformers: tests/test_e2e_compression.py)",
                         lambda r: r.get("status") == "succeeded" and r.get("macs_ratio", 0) > 1),
    "bert_heads50_mlp50_finetune3": ("heads and MLP width removed, runs end to end, fewer MACs",
                                     lambda r: r.get("status") == "succeeded" and r.get("macs_ratio", 0) > 1),
    "load_20_clients_300s": ("nothing lost (every accepted job terminal, run once, artifacts and uploads intact), "
                             "no 5xx", lambda r: r["lost"] == 0 and r["errors_5xx_or_connection"] == 0
                             and r["jobs_run_more_than_once"] == 0 and r["jobs_with_bad_events"] == 0
                             and r["hash_or_etag_mismatches"] == 0),
    "job_overhead_warm": ("fixed job overhead (wall minus engine time) <= 1 s with a warm sandbox",
                          lambda r: r["median_overhead_s"] <= 1.0 and all(j["warm"] for j in r["jobs"])),
    "resnet_prune50_preset": ("the prune-50 preset with its default outputs: size ratio above 1.5x",
                              lambda r: r.get("size_ratio", 0) > 1.5),
    "resnet_palette16": ("safetensors >= 6x smaller, accuracy drop <= 0.5 point",
                         lambda r: r.get("size_ratio", 0) >= 6 and r.get("accuracy_drop", 1) <= 0.005),
    "large_pt2_2gib_prune50": ("the job succeeds; API and worker each peak below 1/8 of the file (streamed); the "
                               "sandbox's peak stays under the memory limit it was given",
                               lambda r: r["status"] == "succeeded"
                               and max(r["api_peak_rss_mib"], r["worker_peak_rss_mib"]) * 8 * 2**20 < r["model_bytes"]
                               and r["sandbox_vm_peak_gib"] < r["sandbox_memory_limit_gib"]),
    # The LLM suite (bench/llm.py): SmolLM2-135M on pydoc text; perplexity increases relative to the original.
    "gptq_w4a16_g64": ("perplexity increase <= half of RTN's (same int4 g64), hf <= 0.45x the bf16 safetensors",
                       lambda r: r.get("gptq_vs_rtn", 1) <= 0.5 and r.get("size_ratio_vs_bf16", 1) <= 0.45),
    "awq_w4a16_g64": ("perplexity increase <= half of RTN's (same int4 g64), hf <= 0.45x the bf16 safetensors",
                      lambda r: r.get("awq_vs_rtn", 1) <= 0.5 and r.get("size_ratio_vs_bf16", 1) <= 0.45),
    "sparsegpt_50": ("perplexity increase <= half of magnitude's (same 50% per layer)",
                     lambda r: r.get("sparsegpt_vs_magnitude", 1) <= 0.5),
    "w8a8_smoothquant": ("perplexity within +3% of the original",
                         lambda r: r.get("status") == "succeeded" and r["perplexity_increase"] <= 0.03),
}


def _int8_met(r: dict) -> bool:
    return (r.get("size_ratio", 0) >= 3.5 and r.get("speedup_onnxruntime_b32", 0) >= 2.5
            and r.get("accuracy_drop", 1) <= 0.005 and r.get("agreement", 0) >= 0.99)


def render(results: dict[str, dict]) -> str:
    """The tables of bench/RESULTS.md, written from the JSON results only (the notes after them: hand_notes)."""
    lines = ["# Benchmark results", "", "The tables are written by `make bench` from `bench/results/*.json`; the notes "
             "after them are written by hand and kept by each run.", ""]
    for name, result in sorted(results.items()):
        env = result["environment"]
        lines += [f"## {name}", "", f"Command: `{result['command']}` ({result['seconds']} s, {env['date']}, "
                  f"{env['cores']} cores, CPU flags {env.get('cpu_flags', 'not recorded')}, torch {env['torch']}, "
                  f"Python {env['python']})", "",
                  *([f"Rows rerun since, each stamped with its host: `{result['rerun']}`", ""]
                    if result.get("rerun") else []),
                  "| benchmark | figures | target | met |", "|---|---|---|---|"]
        for key, figures in result["results"].items():
            summary = {k: ("/".join(v) or "-") if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
                       for k, v in figures.items() if not (isinstance(v, (list, dict)) and k != "flags")}
            target, check = TARGETS.get(key, ("", None))
            met = "" if check is None else ("yes" if check(figures) else "**no**")
            lines.append(f"| {key} | {', '.join(f'{k}={v}' for k, v in summary.items())} | {target} | {met} |")
        lines.append("")
        for key, figures in result["results"].items():
            if isinstance(figures.get("endpoints"), dict):  # the load suite: one row per endpoint
                lines += [f"{key}, per endpoint (latency from send to last byte, ms):", "",
                          "| endpoint | requests | errors | unexpected 4xx | p50 | p95 | p99 | max |",
                          "|---|---|---|---|---|---|---|---|"]
                lines += [f"| `{name}` | {e['requests']} | {e['errors']} | {e['unexpected_4xx']} | {e['p50_ms']} | "
                          f"{e['p95_ms']} | {e['p99_ms']} | {e['max_ms']} |"
                          for name, e in figures["endpoints"].items()]
                lines.append("")
        for key, figures in result["results"].items():
            if isinstance(figures.get("peak_rss_mib"), dict):  # the large suite: one row per phase
                procs = ("api", "worker", "sandbox", "bench_client")
                every = (figures.get("details") or {}).get("sample_interval_s")
                lines += [f"{key}, peak RSS per process and phase (MiB, sampled every {every} s; - = not running):",
                          "", "| phase | " + " | ".join(procs) + " |", "|---" * (len(procs) + 1) + "|"]
                lines += [f"| {phase} | " + " | ".join(str(peaks.get(p) or "-") for p in procs) + " |"
                          for phase, peaks in figures["peak_rss_mib"].items()]
                stages = figures.get("sandbox_peak_rss_mib_by_stage") or {}
                lines += ["", "Sandbox peak RSS by engine stage (MiB): "
                          + ", ".join(f"{stage} {mib}" for stage, mib in stages.items()), ""]
    return "\n".join(lines)


NOTES_HEADING = "## Notes"


def hand_notes(path: Path) -> str:
    """The hand-written part of RESULTS.md (from NOTES_HEADING on: host notes, measured facts), kept by a new run."""
    text = path.read_text() if path.exists() else ""
    at = text.find(f"\n{NOTES_HEADING}\n")
    return text[at:] if at >= 0 else ""


def main(argv: list[str]) -> None:
    names = argv or list(SUITES)
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
            started = time.time()
            result = {"command": f"python -m bench.run {name}", "environment": environment(),
                      "results": SUITES[name](Path(work))}
            result["seconds"] = round(time.time() - started, 1)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    everything = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    target = RESULTS.parent / "RESULTS.md"
    target.write_text(render(everything) + hand_notes(target))


if __name__ == "__main__":
    main(sys.argv[1:])
