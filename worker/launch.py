"""Starting a job's sandbox, cold or warm (docs/security.md, "Warm sandboxes").

Every sandbox is started the same way: a uid of its own (worker/uid_slots.py), an empty job directory, then
``python -I -m worker.sandbox --warm JOBDIR`` under worker/isolation.py. It imports torch, ONNX and ONNX
Runtime, says ``ready`` and waits for ``go`` on stdin; the supervisor stages the job's inputs into the job
directory meanwhile. A cold start stages while the sandbox imports; a warm one was started ahead of the job.

:class:`WarmPool` keeps ``SQUEEZE_SANDBOX_WARM`` sandboxes per worker process started ahead, made while the
worker has no job running (warming up costs CPU a running job's timings would feel). A warm sandbox is started
before any team is known and runs one job only: it is thrown away after it, so nothing carries from one job
(or team) to the next. Where its memory limit is a cgroup's (worker/cgroups.py), the limit is set to the
job's when it is handed over; under RLIMIT_AS alone it serves only jobs at the floor it was started with.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Iterator

from app.core.config import Settings
from worker import cgroups, isolation, uid_slots
from worker.jobdir import prepare_jobdir

log = logging.getLogger("squeeze.launch")


@dataclass
class Sandbox:
    """A started sandbox: its process (waiting for `go` until :meth:`go`), job directory, stderr and uid."""

    proc: subprocess.Popen
    jobdir: Path
    stderr: IO[bytes]
    limits: isolation.SandboxLimits
    warm: bool
    held: ExitStack = field(repr=False)
    cgroup: cgroups.JobCgroup | None = None

    @property
    def uid(self) -> int | None:
        return self.limits.uid

    def describe(self) -> dict:
        return {**getattr(self.proc, "isolation", {}), "warm": self.warm, "host_pid": self.proc.pid}

    def fit_memory(self, memory_bytes: int) -> bool:
        """Gives the sandbox this memory limit if its cgroup can take it now; False where it cannot."""
        if memory_bytes == self.limits.memory_bytes:
            return True
        if self.cgroup is None or not self.cgroup.set_memory(memory_bytes):
            return False
        self.limits = replace(self.limits, memory_bytes=memory_bytes)
        return True

    def peak_memory_bytes(self) -> int | None:
        return self.cgroup.peak_memory_bytes() if self.cgroup is not None else None

    def out_of_memory(self) -> bool:
        """The kernel's OOM killer ended a process of the job (its cgroup's memory limit was reached)."""
        return self.cgroup is not None and self.cgroup.oom_kills() > 0

    def go(self) -> None:
        """The job is staged: give its files to the job's uid and let the sandbox run it."""
        prepare_jobdir(self.jobdir, self.limits)
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def close(self, job_id: str = "") -> None:
        """Kills what is left of the sandbox, checks no process of its uid survives, frees the uid and the job
        directory. Safe to call twice."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()
        if self.cgroup is not None:
            killed = self.cgroup.close()
            if killed:
                log.error("job %s: %d processes of the sandbox's cgroup outlived it and were killed: %s", job_id,
                          len(killed), killed)
        if self.uid is not None:
            killed = uid_slots.kill_processes_of(self.uid, grace=2.0)  # the namespace's teardown
            if killed:
                log.error("job %s: %d processes of sandbox uid %d outlived it and were killed: %s", job_id,
                          len(killed), self.uid, killed)
        self.held.close()  # closes and removes the stderr file, releases the uid slot
        shutil.rmtree(self.jobdir, ignore_errors=True)


def limits_for(settings: Settings, memory_bytes: int, uid: int | None) -> isolation.SandboxLimits:
    return isolation.SandboxLimits(
        memory_bytes=memory_bytes,
        # CPU time is a backstop to the wall-clock timeout: every core may burn it in parallel.
        cpu_seconds=int(settings.job_timeout_s * max(1, settings.threads)) + 60,
        file_bytes=settings.sandbox_file_bytes,
        max_processes=settings.sandbox_max_processes,
        uid=uid,
        allow_weak=settings.sandbox_allow_weak,
    )


@contextmanager
def _job_uid(settings: Settings) -> Iterator[int | None]:
    """The job's own uid from the configured range when the worker is root; else None (the caller's uid)."""
    if os.geteuid() != 0:
        yield None
        return
    with uid_slots.slot(settings.sandbox_uid_first, settings.sandbox_uid_count, settings.sandbox_slot_dir) as uid:
        yield uid


def _job_cgroup(settings: Settings, name: str, limits: isolation.SandboxLimits) -> cgroups.JobCgroup | None:
    """The sandbox's cgroup (named for its uid slot, so a dead worker's leftover is replaced by the slot's next
    holder), or None where the host delegates none or SQUEEZE_SANDBOX_CGROUPS is off."""
    if not settings.sandbox_cgroups or not cgroups.hierarchies():
        return None
    name = f"uid-{limits.uid}" if limits.uid is not None else f"job-{name}"
    try:
        return cgroups.create(name, cgroups.CgroupLimits(limits.memory_bytes, limits.max_processes,
                                                         float(settings.threads)))
    except OSError as exc:
        raise isolation.SandboxError(f"could not make the sandbox's cgroup {name}: {exc}") from exc


def server_paths(settings: Settings) -> list[Path]:
    """The server's own folders: covered in the sandbox should a tree it reads (the venv, say) hold one."""
    paths = [settings.data_dir]
    if settings.blob_url.startswith("file://"):
        paths.append(Path(settings.blob_url.removeprefix("file://")))
    if settings.database_url.startswith("sqlite:///"):
        paths.append(Path(settings.database_url.removeprefix("sqlite:///")).parent)
    return paths


def start(settings: Settings, name: str, memory_bytes: int, *, warm: bool = False) -> Sandbox:
    """Starts a sandbox in jobs_dir/name, waiting for its job. Raises isolation.SandboxError when it cannot."""
    held = ExitStack()
    try:
        limits = limits_for(settings, memory_bytes, held.enter_context(_job_uid(settings)))
        jobdir = settings.jobs_dir / name
        shutil.rmtree(jobdir, ignore_errors=True)  # a previous attempt's leftovers
        prepare_jobdir(jobdir, limits)
        stderr = held.enter_context(open(jobdir.parent / f"{name}.stderr", "w+b"))
        held.callback(Path(stderr.name).unlink, missing_ok=True)
        group = _job_cgroup(settings, name, limits)
        if group is not None:
            held.callback(group.close)  # before the uid slot is released (the stack unwinds in reverse)
        proc = isolation.spawn([sys.executable, "-I", "-m", "worker.sandbox", "--warm", str(jobdir)], jobdir,
                               limits, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                               hidden_paths=server_paths(settings), cgroup=group,
                               extra_env={"OMP_NUM_THREADS": str(settings.threads)})
    except BaseException:
        held.close()
        if "jobdir" in locals():
            shutil.rmtree(jobdir, ignore_errors=True)
        raise
    return Sandbox(proc, jobdir, stderr, limits, warm, held, group)


class WarmPool:
    """Sandboxes started ahead of their job, for one worker process (see the module's docstring)."""

    def __init__(self, settings: Settings):
        self.settings, self.ready, self.running = settings, [], 0
        self.cond = threading.Condition()
        self.stopped = False

    def take(self, memory_bytes: int) -> Sandbox | None:
        """A warm sandbox for a job with this memory limit, if one is ready; counts the job as running."""
        with self.cond:
            self.running += 1
            while self.ready:
                sandbox = self.ready.pop(0)
                if sandbox.proc.poll() is None and sandbox.fit_memory(memory_bytes):
                    return sandbox
                sandbox.close()
        return None

    def job_done(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()

    def keep(self) -> None:
        """The keeper thread's loop: refills the pool while no job runs. It is also the warm sandboxes' parent
        thread (PDEATHSIG follows the thread that spawned them), so it lives as long as the worker process."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopped or (self.running == 0
                                                            and len(self.ready) < self.settings.sandbox_warm))
                if self.stopped:
                    return
            sandbox = self._warm_one()
            with self.cond:
                if sandbox is not None:
                    self.ready.append(sandbox)
                elif not self.stopped:
                    self.cond.wait(timeout=30)  # a failing start is not retried in a tight loop

    def _warm_one(self) -> Sandbox | None:
        began = time.monotonic()
        try:
            sandbox = start(self.settings, f"warm-{os.getpid()}-{uuid.uuid4().hex[:12]}",
                            self.settings.sandbox_memory_bytes, warm=True)
        except (isolation.SandboxError, uid_slots.NoFreeSlot, OSError) as exc:
            log.warning("could not start a warm sandbox: %s", exc)
            return None
        if sandbox.proc.stdout.readline().strip() != b'{"type": "ready"}':
            log.warning("a warm sandbox exited before it was ready; see its stderr")
            sandbox.close()
            return None
        log.info("warm sandbox ready in %.2f s", time.monotonic() - began)
        return sandbox

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            ready, self.ready = self.ready, []
            self.cond.notify_all()
        for sandbox in ready:
            sandbox.close()


_POOL: WarmPool | None = None


def start_pool(settings: Settings) -> WarmPool | None:
    """Probes the host's cgroups and starts this process's keeper thread (the worker does, once it is ready); None
    when SQUEEZE_SANDBOX_WARM is 0."""
    global _POOL
    if settings.sandbox_cgroups and os.geteuid() == 0:
        cgroups.hierarchies()  # the host's cgroups are probed once, now, rather than on the first job
    if settings.sandbox_warm == 0 or _POOL is not None:
        return _POOL
    _POOL = WarmPool(settings)
    threading.Thread(target=_POOL.keep, name="warm-sandboxes", daemon=True).start()
    return _POOL


def pool() -> WarmPool | None:
    return _POOL


def stop_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.stop()
        _POOL = None
