"""Large models (issue 9): a ~2 GiB .pt2 of random fp32 weights through a real stack (one API, one worker), with
the peak RSS of the API, the Celery worker and the sandbox sampled during upload, processing and download.

    python -m bench.run large

The stack is the embedded default: SQLite, the filesystem broker and local blobs (one data dir), so the worker
stages the model by copying it out of the blob store into its job dir. The model is built in a child process
(`python -m bench.large build PATH BYTES`), so this process never holds the weights: it streams the file up and
the artifact down in 1 MiB pieces.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil

from testing.stack import Stack, make_backend, wait_for

MiB, GiB = 1024**2, 1024**3
WIDTH = 4096  # Linear(4096, 4096): 64 MiB of fp32 weights per layer
RECIPE = {"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
          # random weights, no dataset: accuracy is not measured; latency on random inputs of the model's shape
          "evaluate": {"batch_sizes": [1], "warmup": 1, "repeats": 2}}


def build_pt2(path: Path, target_bytes: int, width: int = WIDTH) -> None:
    """A Sequential of Linear(width, width) + ReLU layers with about `target_bytes` of fp32 weights, exported with
    torch.export and saved with torch.export.save. Layers are allocated one at a time (default init, in place):
    the process holds the weights once, and the export shares them."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = max(1, round(target_bytes / (width * width * 4)))
    model = nn.Sequential()
    for _ in range(layers):
        model.append(nn.Linear(width, width))
        model.append(nn.ReLU())
    model.eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, width),))
    torch.export.save(program, str(path))


class Sampler(threading.Thread):
    """Samples the RSS of the API, the Celery worker, the sandbox (the worker's children) and this process every
    `interval` seconds, keeping the peak of each per phase; the sandbox's own high-water marks (VmHWM, VmPeak) come
    from /proc and catch peaks between samples."""

    def __init__(self, api_pid: int, worker_pid: int, interval: float = 0.1):
        super().__init__(daemon=True, name="rss-sampler")
        self.api, self.worker, self.me = psutil.Process(api_pid), psutil.Process(worker_pid), psutil.Process()
        self.interval, self.phase, self.stage = interval, "idle", None
        self.peaks: dict[str, dict[str, int]] = {}
        self.stage_peaks: dict[str, int] = {}
        self.sandbox_marks: dict[str, dict[str, int]] = {}  # phase -> VmHWM, VmPeak of the sandbox
        self.samples = 0
        self.halt = threading.Event()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)
                if k in ("VmHWM", "VmPeak")}

    def sample(self) -> None:
        rss = {"api": self.api.memory_info().rss, "worker": self.worker.memory_info().rss,
               "bench_client": self.me.memory_info().rss, "sandbox": 0}
        for child in self.worker.children(recursive=True):
            try:
                rss["sandbox"] = max(rss["sandbox"], child.memory_info().rss)
                marks = self._status(child.pid)
            except psutil.NoSuchProcess:
                continue
            phase_marks = self.sandbox_marks.setdefault(self.phase, {})
            for mark, value in marks.items():
                phase_marks[mark] = max(phase_marks.get(mark, 0), value)
        peaks = self.peaks.setdefault(self.phase, {})
        for name, value in rss.items():
            peaks[name] = max(peaks.get(name, 0), value)
        if self.stage and rss["sandbox"] and self.phase == "process":
            self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), rss["sandbox"])
        self.samples += 1

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.sample()
            except psutil.NoSuchProcess:
                pass
            time.sleep(self.interval)


def _upload(stack: Stack, key: str, path: Path) -> tuple[dict, float]:
    """POST /v1/models with the file as the body, sent from the file in 1 MiB blocks (never read whole)."""
    url = urlparse(stack.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=1800, blocksize=MiB)
    started = time.perf_counter()
    with open(path, "rb") as f:
        conn.request("POST", f"/v1/models?name={path.name}", body=f,
                     headers={"Authorization": f"Bearer {key}", "Content-Length": str(path.stat().st_size),
                              "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        body = resp.read()
    seconds = time.perf_counter() - started
    conn.close()
    if resp.status != 201:
        raise RuntimeError(f"upload answered {resp.status}: {body[:500]!r}")
    return json.loads(body), seconds


def _download(client, url: str, dest: Path) -> tuple[int, str, float]:
    digest, size = hashlib.sha256(), 0
    started = time.perf_counter()
    with client.stream("GET", url, timeout=1800) as resp, open(dest, "wb") as out:
        resp.raise_for_status()
        for chunk in resp.iter_bytes(MiB):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, digest.hexdigest(), time.perf_counter() - started


def _mib(n: int) -> float:
    return round(n / MiB, 1)


def _run_job(client, sampler: Sampler, model_id: str) -> tuple[dict, float, dict]:
    """Submits RECIPE on the model and waits; the sampler follows the job's stage. Returns the job, its wall time
    from submit to finish, and the data of its `sandbox` event (the memory limit the supervisor applied)."""
    submitted = time.perf_counter()
    r = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
    r.raise_for_status()
    job_id = r.json()["id"]

    def note_stage(job: dict) -> bool:
        sampler.stage = (job.get("stage") or "").split(".")[0] or None
        return job["status"] in ("succeeded", "failed", "canceled")

    job = wait_for(client, job_id, note_stage, timeout=3600, interval=0.5)
    seconds = time.perf_counter() - submitted
    sampler.stage = None
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    sandbox = next((e["data"] for e in events if e["type"] == "sandbox"), {})
    return job, seconds, sandbox


def _build(path: Path, target_bytes: int, width: int = WIDTH) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.large", "build", str(path), str(target_bytes), str(width)],
                   check=True, cwd=Path(__file__).resolve().parent.parent)
    return time.perf_counter() - started


def run_large(workdir: Path, target_bytes: int = 2 * GiB) -> dict:
    model_path, tiny_path = workdir / "large.pt2", workdir / "tiny.pt2"
    build_s = _build(model_path, target_bytes)
    _build(tiny_path, 64 * 64 * 4, width=64)  # the reference job: one 64x64 layer, the engine's fixed cost
    size = model_path.stat().st_size
    data_dir = workdir / "data"
    data_dir.mkdir()
    stack = Stack(make_backend("sqlite", data_dir), data_dir, workdir)
    sampler = None
    try:
        stack.start_api()
        worker = stack.start_worker(concurrency=1)
        r = stack.admin.post("/v1/keys", json={"team": "large", "name": "bench"})
        r.raise_for_status()
        key = r.json()["key"]
        client = stack.client(key)
        time.sleep(3)  # the worker's imports: its baseline, not part of a phase
        sampler = Sampler(stack.api_proc.pid, worker.pid)
        sampler.sample()
        baseline = dict(sampler.peaks["idle"])
        sampler.start()

        os.sync()
        sampler.phase = "upload"
        model, upload_s = _upload(stack, key, model_path)
        assert model["size_bytes"] == size, model

        sampler.phase = "process"
        job, job_s, sandbox = _run_job(client, sampler, model["id"])

        download = {}
        if job["status"] == "succeeded":
            sampler.phase = "download"
            art = next(a for a in job["artifacts"] if a["name"] == "model.pt2")
            got, sha, download_s = _download(client, f"/v1/jobs/{job['id']}/artifacts/model.pt2",
                                             workdir / "downloaded.pt2")
            assert got == art["size_bytes"] and sha == art["sha256"], (got, sha, art)
            download = {"download_mib_per_s": round(got / MiB / download_s, 1), "download_s": round(download_s, 2)}
            (workdir / "downloaded.pt2").unlink()

        sampler.phase = "tiny"
        tiny, _ = _upload(stack, key, tiny_path)
        tiny_job, _, _ = _run_job(client, sampler, tiny["id"])
        sampler.phase = "done"
        time.sleep(0.3)
    finally:
        if sampler is not None:
            sampler.halt.set()
            sampler.join()
        stack.stop()
        for path in (model_path, tiny_path, workdir / "downloaded.pt2"):
            path.unlink(missing_ok=True)

    peaks = {phase: {name: _mib(v) for name, v in values.items()}
             for phase, values in sampler.peaks.items() if phase in ("upload", "process", "download")}
    metrics = job.get("metrics") or {}
    marks = sampler.sandbox_marks.get("process", {})
    tiny_marks = sampler.sandbox_marks.get("tiny", {})
    limit = sandbox.get("memory_limit_bytes")
    growth = {name: round(max(p[name] for p in peaks.values()) - _mib(baseline[name]), 1)
              for name in ("api", "worker", "bench_client")}
    per_model_byte = None
    if marks.get("VmPeak") and tiny_marks.get("VmPeak") and tiny_job["status"] == "succeeded":
        per_model_byte = round((marks["VmPeak"] - tiny_marks["VmPeak"]) / size, 2)
    return {
        "status": job["status"], "error": job.get("error"),
        "model_bytes": size, "model_gib": round(size / GiB, 3),
        "upload_mib_per_s": round(size / MiB / upload_s, 1), "upload_s": round(upload_s, 2),
        "job_wall_s": round(job_s, 1), **download,
        "api_peak_rss_mib": max(p["api"] for p in peaks.values()), "api_rss_growth_mib": growth["api"],
        "worker_peak_rss_mib": max(p["worker"] for p in peaks.values()), "worker_rss_growth_mib": growth["worker"],
        "sandbox_memory_limit_gib": round(limit / GiB, 2) if limit else None,
        "sandbox_vm_peak_gib": round(marks.get("VmPeak", 0) / GiB, 2),
        "sandbox_peak_rss_gib": round(marks.get("VmHWM", 0) / GiB, 2),
        "tiny_job_sandbox_vm_peak_gib": round(tiny_marks.get("VmPeak", 0) / GiB, 2),
        # what the factor (SQUEEZE_SANDBOX_MEMORY_PER_MODEL_BYTE) has to cover: the big job's address space above
        # the tiny job's, per byte of model file
        "vm_peak_per_model_byte": per_model_byte,
        "details": {
            "backend": "sqlite + filesystem broker + local blobs, 1 API process, 1 worker (concurrency 1)",
            "recipe": RECIPE, "outputs": ["pt2"], "params": (metrics.get("original") or {}).get("params"),
            "build_s": round(build_s, 1), "engine_s": job.get("engine_seconds"),
            "engine_timings_s": (metrics.get("run") or {}).get("timings"),
            "sandbox_event": {k: v for k, v in sandbox.items() if k != "isolation"},
            "sandbox_rlimit_as_bytes": ((sandbox.get("isolation") or {}).get("rlimits") or {}).get("AS"),
            "sandbox_marks_bytes": sampler.sandbox_marks, "tiny_job_status": tiny_job["status"],
            "baseline_rss_mib": {name: _mib(v) for name, v in baseline.items() if name != "sandbox"},
            "bench_client_rss_growth_mib": growth["bench_client"],
            "sample_interval_s": sampler.interval, "samples": sampler.samples,
        },
        "peak_rss_mib": peaks,
        "sandbox_peak_rss_mib_by_stage": {k: _mib(v) for k, v in sampler.stage_peaks.items()},
    }


def bench_large(workdir: Path) -> dict:
    return {"large_pt2_2gib_prune50": run_large(workdir)}


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "build":
        build_pt2(Path(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:]))
    else:
        sys.exit("usage: python -m bench.large build PATH BYTES [WIDTH]")
