"""Per-job cgroups: memory, process-count and CPU limits where the host delegates them (docs/security.md).

A sandbox's processes are put in a cgroup of their own (one per uid slot, ``uid-<uid>``), made under the
worker's own cgroup in each hierarchy that has the controller: cgroup v2 (the unified hierarchy, with the
controller enabled for children) is preferred, a v1 hierarchy per controller is used where that is what the
host mounts. Limits: ``memory`` (resident memory and page cache, swap none; the kernel's OOM killer ends the
job at the limit, which counts RSS rather than address space), ``pids`` (processes and threads of the job,
whatever their uid) and ``cpu`` (a quota of ``cores`` CPUs). At the end of a job everything left in its
cgroups is killed (``cgroup.kill`` on v2, SIGKILL of each member on v1) and the cgroups removed.

A controller is used only once a probe shows the kernel enforces it (a host such as gVisor may take the limits
and not enforce them). Where no hierarchy is writable and enforced (a container without delegation, a non-root
worker) nothing here applies and the sandbox runs under rlimits alone; :func:`worker.isolation_probe.describe`
says which. Stdlib only.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
GROUP_DIR = "squeeze-sandbox"  # made in the worker's own cgroup; job cgroups live below it
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Hierarchy:
    """A cgroup directory under which job cgroups are made, and the controllers it gives them."""

    version: int  # 1 or 2
    base: Path
    controllers: tuple[str, ...]


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    max_processes: int
    cores: float


@dataclass
class JobCgroup:
    """The cgroups of one sandbox, one directory per hierarchy; :meth:`close` empties and removes them."""

    name: str
    dirs: list[tuple[Hierarchy, Path]] = field(default_factory=list)

    @property
    def procs_files(self) -> list[str]:
        """What the sandbox's first process writes its pid into to join (the helper does, as root)."""
        return [str(path / "cgroup.procs") for _, path in self.dirs]

    @property
    def describe(self) -> dict[str, object]:
        return {"version": "+".join(f"v{v}" for v in sorted({h.version for h, _ in self.dirs})),
                "controllers": sorted({c for h, _ in self.dirs for c in h.controllers}),
                "name": self.name}

    def members(self) -> list[int]:
        pids: set[int] = set()
        for _, path in self.dirs:
            try:
                pids.update(int(p) for p in (path / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(pids)

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup (0 without a memory controller)."""
        for hierarchy, path in self.dirs:
            if "memory" in hierarchy.controllers:
                name = "memory.events" if hierarchy.version == 2 else "memory.oom_control"
                return _stat_field(path / name, "oom_kill")
        return 0

    def peak_memory_bytes(self) -> int | None:
        for hierarchy, path in self.dirs:
            if "memory" in hierarchy.controllers:
                name = "memory.peak" if hierarchy.version == 2 else "memory.max_usage_in_bytes"
                try:
                    return int((path / name).read_text())
                except (OSError, ValueError):
                    return None
        return None

    def set_memory(self, memory_bytes: int) -> bool:
        """A new memory limit for the running cgroup; False without a memory controller or if refused (v1
        refuses a limit below what is in use)."""
        for hierarchy, path in self.dirs:
            if "memory" in hierarchy.controllers:
                try:
                    _set_memory(hierarchy, path, memory_bytes)
                except OSError:
                    return False
                return True
        return False

    def kill(self, timeout: float = 5.0) -> list[int]:
        """SIGKILLs every member until none is left; returns the pids that had to be killed."""
        killed: list[int] = []
        for hierarchy, path in self.dirs:
            if hierarchy.version == 2 and (path / "cgroup.kill").exists():
                _write(path / "cgroup.kill", "1")
        deadline = time.monotonic() + timeout
        while (pids := self.members()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        return sorted(set(killed))

    def close(self, timeout: float = 5.0) -> list[int]:
        """Kills what is left and removes the directories (retried while killed processes are reaped)."""
        killed = self.kill(timeout)
        deadline = time.monotonic() + timeout
        for _, path in self.dirs:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        self.dirs = []
        return killed


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _stat_field(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """The worker's own cgroup per controller from /proc/self/cgroup: ``{"memory": "/a/b", "": "/c"}``
    (the key ``""`` is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount point, root of the mount, super options) of each cgroup mount in /proc/self/mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((tail[0], fields[4], fields[3], set(tail[2].split(","))))
    return found


def _inside(mount_point: str, mount_root: str, own: str) -> Path | None:
    """The directory of cgroup ``own`` in a mount whose root is ``mount_root``; None if it is not visible."""
    if mount_root != "/" and own != mount_root and not own.startswith(mount_root.rstrip("/") + "/"):
        return None
    relative = own[len(mount_root):] if mount_root != "/" else own
    return Path(mount_point, relative.lstrip("/"))


def _prepare_v2(own_dir: Path) -> Hierarchy | None:
    """Makes GROUP_DIR in the worker's v2 cgroup and enables the controllers it can give its children."""
    offered = set((own_dir / "cgroup.controllers").read_text().split()) & set(CONTROLLERS)
    if not offered:
        return None
    base = own_dir / GROUP_DIR
    base.mkdir(exist_ok=True)
    enabled = []
    for controller in sorted(offered):
        try:  # the worker's own cgroup must enable it for GROUP_DIR, GROUP_DIR for the job cgroups
            _write(own_dir / "cgroup.subtree_control", f"+{controller}")
            _write(base / "cgroup.subtree_control", f"+{controller}")
            enabled.append(controller)
        except OSError:  # EBUSY: the worker's cgroup holds processes and is not the root ("no internal processes")
            continue
    return Hierarchy(2, base, tuple(enabled)) if enabled else None


def _prepare_v1(own_dir: Path, controller: str) -> Hierarchy:
    base = own_dir / GROUP_DIR
    base.mkdir(exist_ok=True)
    return Hierarchy(1, base, (controller,))


def discover(proc_cgroup: str, mountinfo: str) -> list[Hierarchy]:
    """The writable hierarchies for job cgroups, v2 first; a v1 controller only where v2 does not give it."""
    own = _own_paths(proc_cgroup)
    found: list[Hierarchy] = []
    mounts = _mounts(mountinfo)
    for fstype, point, root, _ in mounts:
        if fstype == "cgroup2" and "" in own and (own_dir := _inside(point, root, own[""])) is not None:
            try:
                hierarchy = _prepare_v2(own_dir)
            except OSError:
                continue
            if hierarchy is not None:
                found.append(hierarchy)
                break
    have = {c for h in found for c in h.controllers}
    for fstype, point, root, options in mounts:
        for controller in sorted((options & set(CONTROLLERS)) - have):
            own_dir = _inside(point, root, own.get(controller, "/"))
            if fstype != "cgroup" or own_dir is None:
                continue
            try:
                found.append(_prepare_v1(own_dir, controller))
                have.add(controller)
            except OSError:
                continue
    return found


# A controller counts only once a probe shows the kernel enforces it: some hosts (gVisor) let a cgroup's limits
# be written and then account without enforcing them; there the sandbox keeps its rlimits instead.
_PROBES = {
    "memory": (CgroupLimits(32 << 20, 64, 1.0), "b = bytearray(128 << 20)"),  # touched: must be OOM-killed
    "pids": (CgroupLimits(1 << 30, 4, 1.0),
             "import os, sys\nn = 0\nfor _ in range(8):\n    try:\n        pid = os.fork()\n    except OSError:\n"
             "        break\n    if pid == 0:\n        import time; time.sleep(2); os._exit(0)\n    n += 1\n"
             "sys.exit(10 + n)"),  # must stop short of 8 children
    "cpu": (CgroupLimits(1 << 30, 64, 0.05), "import time\nend = time.monotonic() + 0.3\nwhile time.monotonic() < end:"
                                            "\n    pass"),  # must be throttled
}


def _enforced(hierarchy: Hierarchy, controller: str) -> bool:
    """Runs the controller's probe in a cgroup of its own: True when the kernel held the probe to its limit."""
    limits, code = _PROBES[controller]
    only = Hierarchy(hierarchy.version, hierarchy.base, (controller,))
    try:
        group = create(f"probe-{os.getpid()}-{controller}", limits, [only])
    except OSError:
        return False
    path = group.dirs[0][1]
    try:
        join = f"import sys; open({str(path / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", join + code], capture_output=True, timeout=30)
        if controller == "memory":
            return proc.returncode != 0 and group.oom_kills() > 0
        if controller == "pids":
            return 10 <= proc.returncode < 18
        return _stat_field(path / "cpu.stat", "nr_throttled") > 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        try:
            group.close()
        except OSError:  # the probe's answer stands; a cgroup that cannot be removed is the host's to clear
            pass


def _verified(found: list[Hierarchy]) -> list[Hierarchy]:
    kept = []
    for hierarchy in found:
        controllers = tuple(c for c in hierarchy.controllers if _enforced(hierarchy, c))
        if controllers:
            kept.append(Hierarchy(hierarchy.version, hierarchy.base, controllers))
    return kept


_DISCOVERED: list[Hierarchy] | None = None


def hierarchies(*, refresh: bool = False) -> list[Hierarchy]:
    """This host's hierarchies for job cgroups, each with the controllers it enforces (empty: none, rlimits
    only). Probed once per process (about a second), then cached."""
    global _DISCOVERED
    if _DISCOVERED is None or refresh:
        try:
            found = discover(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
        except OSError:
            found = []
        _DISCOVERED = _verified(found)
    return list(_DISCOVERED)


def _set_memory(hierarchy: Hierarchy, path: Path, memory_bytes: int) -> None:
    if hierarchy.version == 2:
        _write(path / "memory.max", str(memory_bytes))
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0")
        return
    # v1: memory+swap must stay >= memory: raising, memory+swap goes first; lowering, memory does
    limit, memsw = path / "memory.limit_in_bytes", path / "memory.memsw.limit_in_bytes"
    order = [limit, memsw] if memory_bytes < int(limit.read_text()) else [memsw, limit]
    for file in order:
        if file.exists():
            _write(file, str(memory_bytes))


def _set_limits(hierarchy: Hierarchy, path: Path, limits: CgroupLimits) -> None:
    quota = max(1000, int(limits.cores * CPU_PERIOD_US))
    for controller in hierarchy.controllers:
        if controller == "memory":
            _set_memory(hierarchy, path, limits.memory_bytes)
        elif controller == "pids":
            _write(path / "pids.max", str(limits.max_processes))
        elif controller == "cpu" and hierarchy.version == 2:
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        elif controller == "cpu":
            _write(path / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(path / "cpu.cfs_quota_us", str(quota))


def create(name: str, limits: CgroupLimits, found: list[Hierarchy] | None = None) -> JobCgroup:
    """A fresh cgroup ``name`` in every hierarchy, limits written. A leftover of the same name (a worker that
    died mid-job) is emptied and replaced first. Raises OSError when a hierarchy refuses."""
    group = JobCgroup(name)
    try:
        for hierarchy in hierarchies() if found is None else found:
            path = hierarchy.base / name
            if path.exists():
                JobCgroup(name, [(hierarchy, path)]).close()
            path.mkdir()
            group.dirs.append((hierarchy, path))
            _set_limits(hierarchy, path, limits)
    except OSError:
        group.close()
        raise
    return group
