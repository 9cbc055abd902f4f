"""Process isolation for the model sandbox: bubblewrap, one uid per job, rlimits (docs/security.md).

An uploaded model is untrusted code.  :func:`spawn` starts the sandbox child
(``python -I -m worker.sandbox JOBDIR``) inside `bubblewrap <bwrap>`_ (the
Debian package ``bubblewrap``, the sandbox Flatpak uses), so that it

* has new PID, IPC, UTS, network, mount, user and cgroup namespaces: its own
  ``/proc`` shows only its own processes, SysV IPC and POSIX message queues die
  with it, the network is a ``lo`` of its own;
* sees a root made of read-only binds of exactly what Python and the engine
  need (the interpreter's prefixes, site-packages, the ``app`` and ``worker``
  packages, ``/usr``), its job directory read-write at the same path, private
  size-capped ``/tmp``, ``/var/tmp`` and ``/dev/shm``; nothing else of the host
  (no data dir, database, blob store, other job directory, ``/home``, ``/srv``);
* runs as the job's own uid (one per concurrent slot, :mod:`worker.uid_slots`)
  under rlimits (``AS``, ``CPU``, ``FSIZE``, ``NPROC`` per uid, ``CORE=0``),
  with no capabilities, ``no_new_privs`` and no further user namespaces;
* where the host delegates cgroups, in a cgroup of its own
  (:mod:`worker.cgroups`: memory, pids, cpu); its memory limit then replaces
  ``RLIMIT_AS`` (resident memory, not address space, is what runs out);
* dies whole: ``--die-with-parent`` and the PID namespace's init end every
  process the job started when the job's main process ends or is killed.

How: ``spawn`` execs a small stdlib-only helper, :mod:`worker.isolation_setup`
(no ``preexec_fn``).  As root it joins the job's cgroups, makes a private mount
namespace in which the needed trees are reachable by the job's uid (an
untraversable ancestor such as a 0700 ``/root`` is covered by a tmpfs and the
tree bound back), applies the rlimits, drops to the job's uid, sets
``no_new_privs`` and ``PDEATHSIG`` and execs ``bwrap``.
It reports what it applied over a pipe; bwrap writes its ``--info-fd`` JSON on
the same pipe once the namespaces exist, so ``spawn`` returns only when the
sandbox is up and raises :class:`SandboxError` otherwise (fail closed).

Not root: bwrap runs as the caller's uid in a user namespace (no per-job uid,
no ``NPROC``).  Without a working bwrap the sandbox refuses to start unless
``SandboxLimits.allow_weak`` (``SQUEEZE_SANDBOX_ALLOW_WEAK``, for a
single-user laptop): then the child runs with rlimits, an empty environment
and its own session only, and :func:`describe` lists what is missing.

Stdlib only (with worker/cgroups.py and worker/isolation_setup.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from worker.isolation_setup import MASK_TMPFS_BYTES

__all__ = [
    "SandboxError",
    "SandboxLimits",
    "sandbox_env",
    "spawn",
]

MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Size cap of each private tmpfs for /tmp, /var/tmp, /dev/shm (TMPDIR points into
# the job directory, so these only catch code that hard-codes /tmp).
TMPFS_MAX_BYTES = 256 * 1024 * 1024
TMPDIR_NAME = ".tmp"
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), "
                "or, on a single-user machine only, set SQUEEZE_SANDBOX_ALLOW_WEAK=true")
# Host files a Python process may read at start (the loader cache, time zone); none holds a secret.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd", "group",
             "alternatives")
HOST_READONLY = ("/sys/devices/system/cpu",)  # CPU topology: ONNX Runtime and torch size their thread pools




class SandboxError(RuntimeError):
    """The sandbox could not be started with the protections it requires."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int  # the cgroup's memory limit where there is one, else RLIMIT_AS
    cpu_seconds: int  # RLIMIT_CPU (soft; SIGKILL 5 s later)
    file_bytes: int  # RLIMIT_FSIZE
    max_processes: int  # RLIMIT_NPROC, per uid: applied when the job has a uid of its own
    uid: int | None = None  # the job's own uid (root only); None: the caller's uid
    allow_weak: bool = False  # run without bubblewrap where it is missing (single-user machines only)


# --------------------------------------------------------------------------- helpers


def is_root() -> bool:
    return os.geteuid() == 0


def sandbox_ids(limits: SandboxLimits) -> tuple[int, int]:
    """uid/gid the sandbox runs as (the caller's own ids when not root)."""
    if not is_root():
        return os.geteuid(), os.getegid()
    if limits.uid is None or limits.uid <= 0:
        raise SandboxError("a sandbox started as root needs a uid of its own (SandboxLimits.uid > 0)")
    return limits.uid, limits.uid


def sandbox_env(jobdir: Path | str, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of the sandbox child: nothing is inherited."""
    jobdir = str(jobdir)
    env = {
        "PATH": MINIMAL_PATH,
        "HOME": jobdir,
        "LANG": "C.UTF-8",
        "TMPDIR": os.path.join(jobdir, TMPDIR_NAME),
        "USER": "sandbox",  # getpass.getuser() reads it: the job's uid has no passwd entry
    }
    for key, value in (extra_env or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key:
            raise ValueError(f"invalid environment entry {key!r}")
        env[key] = value
    return env


def _can_traverse(path: str, uid: int, gids: set[int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _ancestors(path: str) -> list[str]:
    """Strict ancestors of an absolute path, top-down, without '/'."""
    parts = Path(path).parts[1:-1]
    return [os.path.join("/", *parts[: i + 1]) for i in range(len(parts))]


def _is_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def runtime_paths(argv: Sequence[str] = ()) -> list[str]:
    """Real paths of the trees the sandboxed interpreter reads: its prefixes, site-packages, the project's
    ``app`` and ``worker`` packages (not the project folder: a default data dir lies in it)."""
    project = Path(__file__).resolve().parents[1]
    candidates: list[str] = [
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.abspath(sys.executable)),
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        str(project / "app"),
        str(project / "worker"),
    ]
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        value = sysconfig.get_paths().get(key)
        if value:
            candidates.append(value)
    try:
        import site

        candidates.extend(site.getsitepackages())
    except Exception:  # pragma: no cover - site disabled
        pass
    if argv and os.path.isabs(argv[0]):
        candidates.append(os.path.dirname(os.path.realpath(argv[0])))
    out = {os.path.realpath(c) for c in candidates if c and os.path.isabs(c) and os.path.isdir(c)}
    # A tree inside another one is bound with it.
    return sorted(p for p in out if not any(q != p and _is_under(p, q) for q in out))


def _plan_reveal(needed: Sequence[str], uid: int, gid: int) -> list[dict[str, Any]]:
    """Mount operations that make each needed tree reachable by ``uid``: every ancestor it cannot traverse
    is covered by a 0755 tmpfs and the needed trees under it are bound back at their own paths. Applied in
    path-depth order, in the helper's private mount namespace, before bwrap (running as ``uid``) reads them."""
    gids, needed_set, covers = {gid}, set(needed), set()

    def fresh_above(target: str) -> bool:
        fresh = False
        for a in _ancestors(target):
            if a in covers:
                fresh = True
            elif a in needed_set:
                fresh = False  # bound back: reachable as it is
            if not fresh and not _can_traverse(a, uid, gids):
                covers.add(a)
                fresh = True
        return fresh

    for p in sorted(needed_set, key=lambda s: (s.count("/"), s)):
        fresh_above(p)
    covers -= needed_set
    ops = [{"op": "cover", "path": c} for c in covers]
    ops += [{"op": "bind", "path": p} for p in needed_set if any(_is_under(p, c) for c in covers)]
    return sorted(ops, key=lambda o: (o["path"].count("/"), o["path"]))


# --------------------------------------------------------------------------- the bwrap command


def bwrap_path() -> str | None:
    return shutil.which("bwrap", path=MINIMAL_PATH)


def _root_links() -> list[str]:
    """/bin, /lib, /lib64, /sbin as on the host: a symlink into /usr (merged /usr) or a read-only bind."""
    args: list[str] = []
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def bwrap_argv(jobdir: str, needed: Sequence[str], hidden: Sequence[str], tmpfs_bytes: int,
               argv: Sequence[str], info_fd: int) -> list[str]:
    """The bwrap command line: namespaces, a minimal read-only root, the job directory read-write."""
    args = [bwrap_path() or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--hostname", "sandbox", "--info-fd", str(info_fd),
            "--proc", "/proc", "--dev", "/dev"]
    for path in TMP_DIRS:  # first: a tree bound below (a checkout under /tmp, say) must stay on top of them
        args += ["--size", str(tmpfs_bytes), "--tmpfs", path]
    args += ["--ro-bind", "/usr", "/usr", *_root_links()]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for path in HOST_READONLY:
        args += ["--ro-bind-try", path, path]
    for path in sorted(needed, key=lambda s: (s.count("/"), s)):
        if not _is_under(path, "/usr"):
            args += ["--ro-bind", path, path]
    for path in hidden:  # a server folder inside a bound tree (a data dir inside the venv, say) is covered
        if any(_is_under(path, n) for n in needed):
            args += ["--size", str(MASK_TMPFS_BYTES), "--tmpfs", path]
    args += ["--bind", jobdir, jobdir, "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", jobdir, "--",
             *argv]
    return args


# --------------------------------------------------------------------------- spawn


def spawn(
    argv: list[str],
    jobdir: Path,
    limits: SandboxLimits,
    *,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    stdin: Any = subprocess.DEVNULL,
    extra_env: dict[str, str] | None = None,
    readable_paths: Sequence[Path | str] = (),
    hidden_paths: Sequence[Path | str] = (),
    cgroup: Any = None,
) -> subprocess.Popen:
    """Start ``argv`` isolated in ``jobdir``; return the Popen of the sandbox.

    The returned process leads its own session/process group; killing it
    (``os.killpg(proc.pid, SIGKILL)``) ends the whole sandbox.  Its
    ``isolation`` attribute is the dict of protections applied (the shape of
    :func:`describe`).  Raises :class:`SandboxError` when the sandbox cannot be
    started with its protections.  ``readable_paths``: further trees the child
    reads; ``hidden_paths``: server folders to cover should a bound tree hold one;
    ``cgroup``: a :class:`worker.cgroups.JobCgroup` the sandbox joins before anything else.
    """
    if not argv:
        raise ValueError("argv is empty")
    jobdir_s = os.path.realpath(str(jobdir))
    if not os.path.isdir(jobdir_s):
        raise SandboxError(f"job directory {jobdir_s} does not exist")
    if jobdir_s == "/" or jobdir_s in [os.path.realpath(d) for d in TMP_DIRS]:
        raise SandboxError(f"refusing job directory {jobdir_s}")
    uid, gid = sandbox_ids(limits)
    env = sandbox_env(jobdir_s, extra_env)
    needed = runtime_paths(argv) + [os.path.realpath(str(p)) for p in readable_paths]
    tmpfs_bytes = max(1024 * 1024, min(limits.file_bytes, TMPFS_MAX_BYTES))
    mode = _mode(limits)
    r, w = os.pipe()
    try:
        target = list(argv)
        if mode != "weak":
            hidden = [os.path.realpath(str(p)) for p in hidden_paths]
            target = bwrap_argv(jobdir_s, needed, hidden, tmpfs_bytes, argv, w)
        config = {
            "mode": mode, "argv": target, "env": env, "jobdir": jobdir_s, "uid": uid, "gid": gid,
            "limits": {"memory_bytes": int(limits.memory_bytes), "cpu_seconds": int(limits.cpu_seconds),
                       "file_bytes": int(limits.file_bytes), "max_processes": int(limits.max_processes)},
            "plan": _plan_reveal([*needed, jobdir_s], uid, gid) if mode == "bwrap-root" else [],
            "parent_pid": os.getpid(), "status_fd": w,
            "cgroup": {**cgroup.describe, "procs": cgroup.procs_files} if cgroup is not None else None,
        }
        helper = [sys.executable, "-I", "-S", "-B", os.path.join(os.path.dirname(os.path.abspath(__file__)), "isolation_setup.py"), json.dumps(config), "--", *target]
        proc = subprocess.Popen(helper, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd="/",
                                close_fds=True, pass_fds=(w,), start_new_session=True)
    finally:
        os.close(w)
    report, error = _read_status(r, mode)
    if error is not None or report is None:
        _reap_failed(proc)
        raise SandboxError(f"sandbox setup failed: {error or f'helper exited with status {proc.returncode}'}")
    proc.isolation = report  # type: ignore[attr-defined]
    return proc


def _mode(limits: SandboxLimits) -> str:
    if bwrap_path() is not None:
        return "bwrap-root" if is_root() else "bwrap-user"
    if limits.allow_weak:
        return "weak"
    raise SandboxError(f"bubblewrap (bwrap) is not on {MINIMAL_PATH}: the worker refuses to run model code "
                       f"without it; {INSTALL_HINT}")


def _read_status(r: int, mode: str) -> tuple[dict[str, Any] | None, str | None]:
    """The helper's OK/ERR line, then (bwrap) its --info-fd JSON once the namespaces exist; EOF ends it."""
    chunks = []
    try:
        while data := os.read(r, 65536):
            chunks.append(data)
    finally:
        os.close(r)
    text = b"".join(chunks).decode("utf-8", "replace")
    head, _, rest = text.partition("\n")
    kind, _, payload = head.partition(" ")
    if kind != "OK":
        return None, payload or None
    report = json.loads(payload)
    if rest.startswith("EXECFAIL "):
        return None, rest.partition(" ")[2].strip()
    if mode == "weak":
        return report, None
    try:
        info = json.loads(rest)
    except ValueError:
        return None, "bwrap exited before the sandbox was set up (its message is in the job's stderr)"
    report["namespaces"] = sorted({"user", *(k.removesuffix("-namespace") for k in info if k.endswith("-namespace"))})
    return report, None


def _reap_failed(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
