"""What isolation this host actually applies, measured by starting a probe sandbox (docs/security.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from worker import cgroups
from worker.isolation import SandboxError, SandboxLimits, is_root, spawn
from worker.jobdir import prepare_jobdir

_PROBE_UID = 65534  # the probe runs as nobody: it starts nothing but `python -c pass`


_DESCRIBE_CACHE: dict[tuple, dict[str, Any]] = {}


def describe(limits: SandboxLimits | None = None, *, refresh: bool = False) -> dict[str, Any]:
    """What isolation this host actually applies, measured by a probe sandbox (cached per limits).

    Keys: ``mode`` (bwrap-root / bwrap-user / weak), ``namespaces``, ``uid``,
    ``gid``, ``per_job_uid``, ``rlimits``, ``resource_control``,
    ``no_new_privs``, ``pdeathsig``, ``own_process_group``,
    ``empty_environment``, ``revealed_paths`` and ``missing`` (what is not
    applied, in words).  If the probe fails: ``{"mode": "unavailable", "error": ...}``.
    """
    limits = limits or SandboxLimits(memory_bytes=1 << 30, cpu_seconds=10, file_bytes=1 << 20,
                                     max_processes=64, uid=_PROBE_UID if is_root() else None)
    key = (limits, os.geteuid())
    if not refresh and key in _DESCRIBE_CACHE:
        return dict(_DESCRIBE_CACHE[key])
    base = tempfile.mkdtemp(prefix="squeeze-probe-")
    try:
        jobdir = Path(base) / "job"
        prepare_jobdir(jobdir, limits)
        with _probe_cgroup(limits) as group:
            try:
                proc = spawn([sys.executable, "-I", "-S", "-c", "pass"], jobdir, limits, cgroup=group,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except SandboxError as exc:
                return {"mode": "unavailable", "error": str(exc)}
            proc.wait()
        result = dict(proc.isolation)  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _DESCRIBE_CACHE[key] = result
    return dict(result)


@contextlib.contextmanager
def _probe_cgroup(limits: SandboxLimits) -> Iterator[Any]:
    """The cgroup describe()'s probe runs in, as a job's would (None where the host delegates none)."""
    try:
        group = cgroups.create(f"probe-{os.getpid()}", cgroups.CgroupLimits(limits.memory_bytes,
                                                                            limits.max_processes, 1.0))
    except OSError:
        group = None
    try:
        yield group if group is not None and group.dirs else None
    finally:
        if group is not None:
            group.close()
