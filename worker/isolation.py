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

How: ``spawn`` execs this very file as a small stdlib-only helper
(``python -I -S isolation.py CONFIG -- BWRAP-ARGV``, no ``preexec_fn``).  As
root the helper makes a private mount namespace in which the needed trees are
reachable by the job's uid (an untraversable ancestor such as a 0700 ``/root``
is covered by a tmpfs and the tree bound back), applies the rlimits, drops to
the job's uid, sets ``no_new_privs`` and ``PDEATHSIG`` and execs ``bwrap``.
It reports what it applied over a pipe; bwrap writes its ``--info-fd`` JSON on
the same pipe once the namespaces exist, so ``spawn`` returns only when the
sandbox is up and raises :class:`SandboxError` otherwise (fail closed).

Not root: bwrap runs as the caller's uid in a user namespace (no per-job uid,
no ``NPROC``).  Without a working bwrap the sandbox refuses to start unless
``SandboxLimits.allow_weak`` (``SQUEEZE_SANDBOX_ALLOW_WEAK``, for a
single-user laptop): then the child runs with rlimits, an empty environment
and its own session only, and :func:`describe` lists what is missing.

This module must stay stdlib-only: it runs as the helper with ``-I -S``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "SandboxError",
    "SandboxLimits",
    "describe",
    "open_job_file",
    "prepare_jobdir",
    "sandbox_env",
    "spawn",
]

MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Size cap of each private tmpfs for /tmp, /var/tmp, /dev/shm (TMPDIR points into
# the job directory, so these only catch code that hard-codes /tmp).
TMPFS_MAX_BYTES = 256 * 1024 * 1024
MASK_TMPFS_BYTES = 1024 * 1024  # tmpfs masking a directory: holds only mount points
TMPDIR_NAME = ".tmp"
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), "
                "or, on a single-user machine only, set SQUEEZE_SANDBOX_ALLOW_WEAK=true")
# Host files a Python process may read at start (the loader cache, time zone); none holds a secret.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd", "group",
             "alternatives")
HOST_READONLY = ("/sys/devices/system/cpu",)  # CPU topology: ONNX Runtime and torch size their thread pools

_PROBE_UID = 65534  # describe()'s probe runs as nobody: it starts nothing but `python -c pass`
_HELPER_EXIT_SETUP = 126
_HELPER_EXIT_EXEC = 127

# linux/sched.h, linux/mount.h, linux/prctl.h
CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


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


def _is_root() -> bool:
    return os.geteuid() == 0


def _sandbox_ids(limits: SandboxLimits) -> tuple[int, int]:
    """uid/gid the sandbox runs as (the caller's own ids when not root)."""
    if not _is_root():
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


def prepare_jobdir(jobdir: Path | str, limits: SandboxLimits) -> None:
    """Give the job directory tree to the job's uid (when root), mode 0700.

    Symlinks are not followed (``lchown``), so a planted link cannot make the
    supervisor chown something outside the job directory.
    """
    jobdir = Path(jobdir)
    jobdir.mkdir(parents=True, exist_ok=True)
    (jobdir / TMPDIR_NAME).mkdir(exist_ok=True)
    os.chmod(jobdir, 0o700)
    if not _is_root():
        return
    uid, gid = _sandbox_ids(limits)
    os.lchown(jobdir, uid, gid)
    for root, dirs, files in os.walk(jobdir, followlinks=False):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def open_job_file(jobdir: Path | str, relpath: str | Path, *, max_bytes: int | None = None) -> Any:
    """Open a file the sandbox wrote, for reading by the (privileged) supervisor.

    The job directory belongs to untrusted code: an "output" may be a symlink to
    a host file (``/etc/shadow``), a FIFO that blocks the reader, a hard link or
    a path through a symlinked directory.  This walks ``relpath`` component by
    component with ``O_NOFOLLOW`` relative to the job directory and returns a
    binary file object only for a regular, singly-linked file inside it.
    """
    rel = Path(relpath)
    if rel.is_absolute() or not rel.parts or any(p in ("..", ".", "") for p in rel.parts):
        raise SandboxError(f"invalid job file path {str(relpath)!r}")
    flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(str(jobdir), flags_dir)
    try:
        for part in rel.parts[:-1]:
            nxt = os.open(part, flags_dir, dir_fd=fd)
            os.close(fd)
            fd = nxt
        ffd = os.open(rel.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        raise SandboxError(f"job file {str(relpath)!r} cannot be opened safely: {exc.strerror}") from None
    finally:
        os.close(fd)
    st = os.fstat(ffd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (max_bytes is not None and st.st_size > max_bytes):
        os.close(ffd)
        raise SandboxError(f"job file {str(relpath)!r} is not a plain regular file of acceptable size")
    os.set_blocking(ffd, True)
    return os.fdopen(ffd, "rb")


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
    uid, gid = _sandbox_ids(limits)
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
        helper = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config), "--", *target]
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
        return "bwrap-root" if _is_root() else "bwrap-user"
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


_DESCRIBE_CACHE: dict[tuple, dict[str, Any]] = {}


def describe(limits: SandboxLimits | None = None, *, refresh: bool = False) -> dict[str, Any]:
    """What isolation this host actually applies, measured by a probe sandbox (cached per limits).

    Keys: ``mode`` (bwrap-root / bwrap-user / weak), ``namespaces``, ``uid``,
    ``gid``, ``per_job_uid``, ``rlimits``, ``resource_control``,
    ``no_new_privs``, ``pdeathsig``, ``own_process_group``,
    ``empty_environment``, ``revealed_paths`` and ``missing`` (what is not
    applied, in words).  If the probe fails: ``{"mode": "unavailable", "error": ...}``.
    """
    import tempfile

    limits = limits or SandboxLimits(memory_bytes=1 << 30, cpu_seconds=10, file_bytes=1 << 20,
                                     max_processes=64, uid=_PROBE_UID if _is_root() else None)
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
    from worker import cgroups  # not at the top: the helper runs this file stdlib-only, without the package

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


# --------------------------------------------------------------------------- helper side
# Everything below runs in the helper process, between fork/exec of the helper
# and execve of bwrap (or, weak mode, the target).  Only stdlib, no threads.


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
        os._exit(_HELPER_EXIT_SETUP)
    send("OK", json.dumps(report))
    # bwrap writes its --info-fd JSON on the same pipe and closes it; the weak target must not inherit it.
    os.set_inheritable(status_fd, cfg["mode"] != "weak")
    try:
        os.execve(argv[0], argv, cfg["env"]) if os.path.isabs(argv[0]) else os.execvpe(argv[0], argv, cfg["env"])
    except OSError as exc:
        send("EXECFAIL", f"cannot execute {argv[0]!r}: {exc}".replace("\n", " "))
    os._exit(_HELPER_EXIT_EXEC)


if __name__ == "__main__":
    _helper_main(sys.argv)
