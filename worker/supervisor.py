"""Runs one claimed job in the sandbox: stage inputs, spawn, relay progress, heartbeat, cancel, timeout,
then store the artifacts (blob first; rows come with `lifecycle.finish`).

Nothing here loads a model: the sandbox child does, isolated (worker/isolation.py). Everything the
child sends back (protocol lines, artifact files) is untrusted and checked before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue as queue_mod
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from app.blobs.store import FULL_ERRNOS, BlobStore, make_store
from app.core.config import Settings, get_settings
from app.core.db import database_unreachable, session_scope
from app.jobs.lifecycle import Claim, Outcome, heartbeat
from app.recipes import Recipe
from app.reports import check_guard, guard_message
from worker import isolation, launch
from worker.jobdir import open_job_file
from worker.memory import MemoryBudget, gib, sandbox_memory

log = logging.getLogger("squeeze.supervisor")

MODEL_SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "package": ".zip", "hf": ".zip"}
ARTIFACT_FORMATS = {"pt2", "onnx", "package", "hf", "safetensors", "json", "png"}
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
STDERR_TAIL = 4000
MAX_ERROR_MESSAGE = 4000


class OutputLimit(Exception):
    """The sandbox sent more than a job may: the job fails with `sandbox_output_limit`."""


class _Relay(threading.Thread):
    """Reads the child's protocol lines into a queue; a malformed line is reported, not trusted. A line longer
    than `max_line` ends the relay with an `overflow` message (the supervisor then kills the sandbox)."""

    def __init__(self, stream, max_line: int):
        super().__init__(daemon=True, name="sandbox-relay")
        self.stream, self.lines, self.max_line = stream, queue_mod.Queue(), max_line

    def run(self) -> None:
        for raw in iter(lambda: self.stream.readline(self.max_line + 1), b""):
            if len(raw) > self.max_line:
                self.lines.put({"type": "overflow", "reason": f"a protocol line longer than {self.max_line} bytes "
                                                              "(SQUEEZE_SANDBOX_MAX_LINE_BYTES)"})
                break
            try:
                msg = json.loads(raw)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                msg = {"type": "invalid", "raw": raw[:200].decode("utf-8", "replace")}
            self.lines.put(msg)
        self.lines.put(None)


class _EventBudget:
    """Counts what the sandbox makes the supervisor store (events and their bytes) against the job's caps."""

    def __init__(self, settings: Settings):
        self.max_events, self.max_bytes = settings.sandbox_max_events, settings.sandbox_max_event_bytes
        self.count = self.bytes = 0

    def admit(self, name: str, message: str | None, data: dict[str, Any]) -> None:
        self.count += 1
        self.bytes += len(name) + len(message or "") + len(json.dumps(data, default=str))
        if self.count > self.max_events:
            raise OutputLimit(f"more than {self.max_events} events (SQUEEZE_SANDBOX_MAX_EVENTS)")
        if self.bytes > self.max_bytes:
            raise OutputLimit(f"more than {self.max_bytes} bytes of events (SQUEEZE_SANDBOX_MAX_EVENT_BYTES)")


def stage(claim: Claim, jobdir: Path, store: BlobStore, settings: Settings) -> None:
    """Pulls the inputs from the blob store into the job directory (no disk shared with the API assumed)."""
    (jobdir / "inputs").mkdir(exist_ok=True)
    (jobdir / "out").mkdir(exist_ok=True)
    model_rel = f"inputs/model{MODEL_SUFFIX[claim.model_format]}"
    store.fetch(claim.model_sha256, jobdir / model_rel)
    datasets = {}
    for role, ds in claim.datasets.items():
        rel = f"inputs/{role}.{ds['format']}"
        store.fetch(ds["sha256"], jobdir / rel)
        datasets[role] = rel
    teachers = {}
    for i, (ident, row) in enumerate(sorted(claim.teachers.items())):
        rel = f"inputs/teacher{i}{MODEL_SUFFIX[row['format']]}"
        store.fetch(row["sha256"], jobdir / rel)
        teachers[ident] = {"path": rel, "format": row["format"]}
    spec = {"job_id": claim.job_id, "model": {"path": model_rel, "format": claim.model_format,
                                              "sha256": claim.model_sha256},
            "recipe": claim.recipe, "outputs": claim.outputs, "datasets": datasets, "teachers": teachers,
            "threads": settings.threads, "device": settings.device}
    (jobdir / "job.json").write_text(json.dumps(spec))


def collect_artifact(jobdir: Path, entry: Any, store: BlobStore, tmp_dir: Path) -> dict[str, Any]:
    """Copies one artifact the child names out of out/ into the blob store, refusing anything but a
    plain regular file directly in out/ (no links, no paths: the child is untrusted)."""
    if not isinstance(entry, dict):
        raise ValueError("artifact entry is not an object")
    name, fmt, rel = entry.get("name"), entry.get("format"), entry.get("path", entry.get("name"))
    if not (isinstance(name, str) and ARTIFACT_NAME.match(name)) or fmt not in ARTIFACT_FORMATS:
        raise ValueError(f"invalid artifact name/format: {name!r} {fmt!r}")
    if not (isinstance(rel, str) and ARTIFACT_NAME.match(rel)):
        raise ValueError(f"invalid artifact path: {rel!r}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open_job_file(jobdir, f"out/{rel}") as src:  # no links, FIFOs or hard links
        with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="artifact-", delete=False) as dst:
            for chunk in iter(lambda: src.read(1024 * 1024), b""):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
    sha = digest.hexdigest()
    store.put_file(Path(dst.name), sha)
    return {"name": name, "format": fmt, "size_bytes": size, "sha256": sha}


def _guard_verdict(recipe: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    guard = Recipe.model_validate(recipe).guard
    if guard is None:
        return None
    return check_guard(guard, metrics or {})


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(claim: Claim, settings: Settings | None = None, store: BlobStore | None = None) -> Outcome | None:
    """Runs the job to an Outcome; None when the lease was lost (another attempt owns the job)."""
    settings = settings or get_settings()
    store = store or make_store(settings)
    warm = launch.pool()
    try:
        return _run(claim, settings, store, warm)
    except Exception as exc:
        log.exception("job %s: supervisor error", claim.job_id)
        return Outcome("failed", "internal", f"supervisor error: {type(exc).__name__}: {exc}")
    finally:
        if warm is not None:
            warm.job_done()


def _run(claim: Claim, settings: Settings, store: BlobStore, warm: launch.WarmPool | None) -> Outcome | None:
    try:
        # Sized from the blob store, before staging: a model too big for this worker fails in a second, not after
        # a multi-GB copy and an OOM kill.
        memory = sandbox_memory(settings, store.size(claim.model_sha256)
                                + sum(store.size(t["sha256"]) for t in claim.teachers.values()))
    except FileNotFoundError as exc:
        return Outcome("failed", "input_missing", f"a stored input is missing: {exc}")
    if not memory.fits:
        log.warning("job %s: refused, %s", claim.job_id, memory.refusal(settings))
        return Outcome("failed", "resource_limit", memory.refusal(settings))
    log.info("job %s: sandbox memory limit %d bytes for %d bytes of models", claim.job_id, memory.limit_bytes,
             memory.input_bytes, extra=memory.as_event())
    sandbox = warm.take(memory.limit_bytes) if warm is not None else None
    if sandbox is None:
        try:
            sandbox = launch.start(settings, f"{claim.job_id}-{claim.attempt}", memory.limit_bytes)
        except isolation.SandboxError as exc:
            return Outcome("failed", "sandbox_unavailable", str(exc))
    try:
        try:
            stage(claim, sandbox.jobdir, store, settings)  # while a cold sandbox imports torch
        except FileNotFoundError as exc:
            return Outcome("failed", "input_missing", f"a stored input is missing: {exc}")
        sandbox.go()
        return _supervise(claim, settings, store, sandbox, memory)
    finally:
        sandbox.close(claim.job_id)  # on every path: nothing of the job outlives it


def _tail(stderr) -> str:
    stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, stderr.tell() - STDERR_TAIL))
    return stderr.read().decode("utf-8", "replace")


@dataclass
class _Stream:
    """What the sandbox has said so far, each message checked and counted before anything is kept."""

    budget: _EventBudget
    progress: float = 0.0
    stage: str = "starting"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def take(self, msg: dict[str, Any], events: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        kind = msg.get("type")
        if kind == "progress":
            p = msg.get("progress")
            self.progress = float(p) if isinstance(p, (int, float)) else self.progress
            new_stage = str(msg.get("stage") or self.stage)[:100]
            if new_stage != self.stage:
                self._event(events, "stage", str(msg.get("message") or new_stage)[:2000], {"stage": new_stage})
            self.stage = new_stage
        elif kind == "event":
            data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
            name, message = str(msg.get("name") or "event")[:40], msg.get("message")
            if message is None and name == "step_done":  # never a null message for a finished step
                message = f"step {data.get('index', '?')} ({data.get('type') or 'step'}) done"
            self._event(events, name, str(message)[:2000] if message is not None else None, data)
        elif kind == "result":
            self.result = msg
        elif kind == "error":
            self.error = msg
        elif kind == "ready":
            pass  # the sandbox finished its imports (a cold start says so after `go` was already sent)
        elif kind == "overflow":
            raise OutputLimit(str(msg["reason"]))
        else:
            self._event(events, "protocol_error", f"unexpected line from the sandbox: {msg}"[:500], {})

    def _event(self, events, name: str, message: str | None, data: dict[str, Any]) -> None:
        self.budget.admit(name, message, data)
        events.append((name, message, data))


def _supervise(claim, settings, store, sandbox: launch.Sandbox, memory: MemoryBudget) -> Outcome | None:
    proc, jobdir, stderr = sandbox.proc, sandbox.jobdir, sandbox.stderr
    relay = _Relay(proc.stdout, settings.sandbox_max_line_bytes)
    relay.start()
    started = time.monotonic()
    said = _Stream(_EventBudget(settings))
    events: list[tuple[str, str | None, dict[str, Any]]] = [
        ("sandbox", f"sandbox {'warm' if sandbox.warm else 'started'} ({proc.isolation['mode']}, memory limit "
                    f"{gib(memory.limit_bytes)})", {"isolation": sandbox.describe(), **memory.as_event()})]
    next_beat, eof = 0.0, False
    confirmed = False  # a heartbeat got through after the sandbox's output ended: the lease is still ours
    db_down_since: float | None = None
    while True:
        try:
            msg = relay.lines.get(timeout=0.2)
        except queue_mod.Empty:
            msg = False
        if msg is None:
            eof = True
        elif msg:
            try:
                said.take(msg, events)
            except OutputLimit as exc:
                _kill(proc)
                return _output_limit(claim, exc)
        progress, stage_name = said.progress, said.stage
        now = time.monotonic()
        if (eof or events or now >= next_beat) and (db_down_since is None or now >= next_beat):
            try:
                with session_scope() as db:
                    status = heartbeat(db, claim.job_id, claim.lease, progress=progress, stage=stage_name,
                                       events=events)
            except DBAPIError as exc:
                if not database_unreachable(exc):
                    raise
                # The database is unreachable (a restart, a failover): the sandbox keeps running and the events
                # wait for the next beat. Past heartbeat_timeout_s a reaper requeues the job; the first beat that
                # gets through then finds the lease gone and kills the sandbox, so the job still runs once.
                if db_down_since is None:
                    db_down_since = now
                    log.warning("job %s: heartbeat failed, database unreachable; retrying: %s", claim.job_id,
                                exc.orig)
                next_beat = now + settings.heartbeat_interval_s
            else:
                if db_down_since is not None:
                    log.info("job %s: database reachable again after %.1f s", claim.job_id, now - db_down_since)
                db_down_since = None
                events, next_beat, confirmed = [], now + settings.heartbeat_interval_s, eof
                if status is None:
                    log.warning("job %s: lease lost; killing the sandbox", claim.job_id)
                    _kill(proc)
                    return None
                if status == "canceling":
                    _kill(proc)
                    return Outcome("canceled")
        if now - started > settings.job_timeout_s:
            _kill(proc)
            return Outcome("failed", "timeout", f"the job ran past its time limit of {settings.job_timeout_s:g} s")
        if confirmed:  # the result is reported only while the database answers and the lease holds
            break
    code = proc.wait()
    if code != 0 and sandbox.out_of_memory():
        return _out_of_memory(sandbox, memory)
    return _outcome(code, said.result, said.error, jobdir, store, settings, claim, stderr, memory)


def _out_of_memory(sandbox: launch.Sandbox, memory: MemoryBudget) -> Outcome:
    peak = sandbox.peak_memory_bytes()
    return Outcome("failed", "resource_limit",
                   f"the sandbox ran out of memory: its cgroup's limit of {gib(memory.limit_bytes)} was reached"
                   + (f" (peak {gib(peak)})" if peak else "") + "; the kernel ended the job. Give the worker "
                   "more memory per model byte (SQUEEZE_SANDBOX_MEMORY_PER_MODEL_BYTE) or a smaller model")


def _output_limit(claim, exc: OutputLimit) -> Outcome:
    log.warning("job %s: sandbox output over its limit: %s", claim.job_id, exc)
    return Outcome("failed", "sandbox_output_limit", f"the sandbox sent {exc}; the job was stopped. Send fewer "
                                                     "or smaller events, or ask the operator to raise the limit")


def _outcome(code, result, error, jobdir, store, settings, claim, stderr, memory) -> Outcome:
    if code == 0 and result is not None:
        artifacts = []
        try:
            for entry in result.get("artifacts") or []:
                artifacts.append(collect_artifact(jobdir, entry, store, settings.tmp_dir))
        except (OSError, ValueError, isolation.SandboxError) as exc:
            if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:  # the server's disk, not the sandbox's fault
                log.error("job %s: no space left to store artifacts: %s", claim.job_id, exc)
                return Outcome("failed", "storage_full", "the server has no storage space left for this job's "
                                                         "artifacts; none were recorded (rerun once space is freed)")
            return Outcome("failed", "bad_artifact", f"the sandbox produced an unusable artifact: {exc}")
        metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else None
        seconds = result.get("engine_seconds")
        seconds = float(seconds) if isinstance(seconds, (int, float)) else None
        # The guard is checked here, on this side of the sandbox, from the measured metrics: the sandbox's own
        # verdict (in report.json) is not trusted to decide the job's status.
        verdict = _guard_verdict(claim.recipe, metrics)
        if verdict is not None:
            metrics = {**metrics, "guard": verdict}
            if not verdict["passed"]:
                return Outcome("failed", "guard_failed", guard_message(verdict), metrics=metrics,
                               artifacts=artifacts, engine_seconds=seconds)
        return Outcome("succeeded", metrics=metrics, artifacts=artifacts, engine_seconds=seconds)
    if error is not None and code != 0:
        message = str(error.get("message"))
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[:MAX_ERROR_MESSAGE] + f" ... ({len(message) - MAX_ERROR_MESSAGE} characters cut)"
        return Outcome("failed", str(error.get("code") or "engine_error")[:64], message)
    tail = _tail(stderr)
    if code < 0 or code > 128:  # bwrap exits 128 + N when its child dies of signal N
        sig = _signal_name(-code if code < 0 else code - 128)
        return Outcome("failed", "resource_limit",
                       f"the sandbox was killed by {sig} (memory limit {memory.limit_bytes} bytes, "
                       f"CPU or file-size limit); last output: {tail[-1000:]}")
    if "MemoryError" in tail:
        return Outcome("failed", "resource_limit", f"the sandbox ran out of memory; last output: {tail[-1000:]}")
    return Outcome("failed", "sandbox_crashed", f"the sandbox exited with code {code}; last output: {tail[-1500:]}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
