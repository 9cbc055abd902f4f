"""The sandbox helper's side of worker/isolation.py (docs/security.md): what runs between fork/exec of the helper
and execve of bwrap (or, weak mode, the target), as root where the worker is.

``isolation.spawn`` runs this file as ``python -I -S -B isolation_setup.py CONFIG -- ARGV`` (no ``preexec_fn``):
it joins the job's cgroups, makes a private mount namespace in which the needed trees are reachable by the
job's uid, applies the rlimits, drops to the job's uid, sets ``no_new_privs`` and ``PDEATHSIG``, reports what
it applied over the status pipe and execs. Only stdlib, no threads: it runs without the package on its path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import sys
from typing import Any

MASK_TMPFS_BYTES = 1024 * 1024  # tmpfs masking a directory: holds only mount points
EXIT_SETUP = 126
EXIT_EXEC = 127

# linux/sched.h, linux/mount.h, linux/prctl.h
CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x})")


def _reveal(libc, plan: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Root only: a private mount namespace in which the job's uid can reach the trees bwrap binds."""
    os.umask(0o022)  # the mount points made below must be traversable by the job's uid, whatever the worker's umask
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    held = {op["path"]: os.open(op["path"], os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
            for op in plan if op["op"] == "bind"}
    try:
        for op in plan:
            path = op["path"]
            if op["op"] == "cover":
                _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=755,size={MASK_TMPFS_BYTES}")
            else:
                os.makedirs(path, mode=0o755, exist_ok=True)
                _mount(libc, f"/proc/self/fd/{held[path]}", path, None, MS_BIND | MS_REC)
    finally:
        for fd in held.values():
            os.close(fd)
    report["revealed_paths"] = sorted(op["path"] for op in plan if op["op"] == "bind")


def _join_cgroup(cfg: dict[str, Any], report: dict[str, Any]) -> None:
    """Moves the helper (so everything it starts) into the job's cgroups, before the uid drop."""
    group = cfg["cgroup"]
    if not group:
        report["missing"].append("no cgroup (the host delegates none): memory, processes and CPU are bounded "
                                 "by rlimits only")
        return
    for procs in group["procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    report["cgroup"] = {k: v for k, v in group.items() if k != "procs"}


def _apply_rlimits(cfg: dict[str, Any], report: dict[str, Any], *, nproc: bool) -> None:
    lim = cfg["limits"]
    applied = {}

    def setl(name: str, res: int, soft: int, hard: int) -> None:
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY and hard > cur_hard:
            hard = cur_hard
        soft = min(soft, hard) if hard != resource.RLIM_INFINITY else soft
        resource.setrlimit(res, (soft, hard))
        applied[name] = soft

    memory_cgroup = "memory" in ((cfg["cgroup"] or {}).get("controllers") or ())
    if not memory_cgroup:
        setl("AS", resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"])
    setl("CPU", resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 5)
    setl("FSIZE", resource.RLIMIT_FSIZE, lim["file_bytes"], lim["file_bytes"])
    setl("CORE", resource.RLIMIT_CORE, 0, 0)
    if nproc:
        setl("NPROC", resource.RLIMIT_NPROC, lim["max_processes"], lim["max_processes"])
    else:
        report["missing"].append("RLIMIT_NPROC not applied (it would count all processes of the caller's own uid)")
    report["rlimits"] = applied
    group = cfg["cgroup"]
    report["resource_control"] = f"cgroup {group['version']} + rlimits" if group else "rlimits"


def _drop_uid(cfg: dict[str, Any], report: dict[str, Any]) -> None:
    os.setgroups([])
    os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    if os.getuid() == 0 or os.geteuid() == 0 or os.getresuid() != (cfg["uid"],) * 3:
        raise OSError(errno.EPERM, "uid drop did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError(errno.EPERM, "could regain uid 0 after dropping it")
    report["per_job_uid"] = True


def _new_report(cfg: dict[str, Any]) -> dict[str, Any]:
    weak = cfg["mode"] == "weak"
    return {
        "mode": cfg["mode"], "namespaces": [], "uid": os.geteuid(), "gid": os.getegid(), "per_job_uid": False,
        "rlimits": {}, "resource_control": "none", "no_new_privs": False, "pdeathsig": False,
        "own_process_group": os.getpgrp() == os.getpid() and os.getsid(0) == os.getpid(),
        "empty_environment": set(os.environ) == set(cfg["env"]), "revealed_paths": [],
        "missing": ["no bubblewrap: no namespaces (host processes, files and network are reachable), "
                    "the caller's uid"] if weak else [],
    }


def _setup(cfg: dict[str, Any], report: dict[str, Any]) -> None:
    libc = _libc()
    root = cfg["mode"] == "bwrap-root"
    _join_cgroup(cfg, report)
    if root:
        _reveal(libc, cfg["plan"], report)
    _apply_rlimits(cfg, report, nproc=root)
    if root:
        _drop_uid(cfg, report)
    elif cfg["mode"] == "bwrap-user":
        report["missing"].append(f"no per-job uid (the worker is not root): the job runs as uid {cfg['uid']}")
    report["uid"], report["gid"] = os.geteuid(), os.getegid()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    report["no_new_privs"] = True
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")  # after the uid change
    if os.getppid() != cfg["parent_pid"]:
        raise OSError(errno.ESRCH, "the spawning process is already gone")
    report["pdeathsig"] = True
    os.umask(0o077)
    os.chdir(cfg["jobdir"])
    os.makedirs(cfg["env"]["TMPDIR"], mode=0o700, exist_ok=True)


def _helper_main(args: list[str]) -> None:
    cfg = json.loads(args[1])
    assert args[2] == "--"
    argv = args[3:]
    status_fd = cfg["status_fd"]

    def send(kind: str, payload: str) -> None:
        data = f"{kind} {payload}\n".encode()
        while data:
            data = data[os.write(status_fd, data):]

    report = _new_report(cfg)
    try:
        _setup(cfg, report)
    except BaseException as exc:  # noqa: BLE001 - any failure means: do not run the target
        send("ERR", f"{type(exc).__name__}: {exc}".replace("\n", " "))
        os._exit(EXIT_SETUP)
    send("OK", json.dumps(report))
    # bwrap writes its --info-fd JSON on the same pipe and closes it; the weak target must not inherit it.
    os.set_inheritable(status_fd, cfg["mode"] != "weak")
    try:
        os.execve(argv[0], argv, cfg["env"]) if os.path.isabs(argv[0]) else os.execvpe(argv[0], argv, cfg["env"])
    except OSError as exc:
        send("EXECFAIL", f"cannot execute {argv[0]!r}: {exc}".replace("\n", " "))
    os._exit(EXIT_EXEC)


if __name__ == "__main__":
    _helper_main(sys.argv)
