"""Process isolation for the model sandbox (DESIGN.md §6).

An uploaded model is untrusted code.  :func:`spawn` starts the sandbox child
(``python -I -m worker.sandbox JOBDIR``) so that it

* sees an empty environment (minimal ``PATH``, ``HOME``/``TMPDIR`` in the job
  directory, ``LANG``, plus what the caller passes explicitly);
* leads its own session / process group (the supervisor can ``os.killpg`` it) and
  gets ``SIGKILL`` when the spawning process dies (``PR_SET_PDEATHSIG``);
* runs under rlimits (``AS``, ``CPU``, ``FSIZE``, ``NPROC``, ``CORE=0``) and
  ``PR_SET_NO_NEW_PRIVS``;
* has no network (a fresh network namespace: only a ``lo`` that is down);
* can write only its job directory: a private mount namespace in which ``/tmp``,
  ``/var/tmp`` and ``/dev/shm`` are throw-away tmpfs mounts, the job directory's
  parent is masked (sibling job directories are invisible), and every other
  mount is remounted read-only;
* runs as an unprivileged uid (``limits.user``) when the supervisor is root.

How: ``spawn`` does not use ``preexec_fn`` (unsafe when the supervisor has
threads).  It execs this very file as a small stdlib-only helper
(``python -I -S isolation.py CONFIG -- ARGV``) with the already-empty environment;
the helper does, in order, unshare(NEWNS|NEWNET) -> mounts -> setrlimit ->
setgroups/setgid/setuid -> no_new_privs + PDEATHSIG -> chdir -> execve.  It tells
``spawn`` over a close-on-exec pipe what it applied (or why it failed), so
``spawn`` returns only once the target is exec'ed and raises
:class:`SandboxError` if a required protection failed.

As root the namespaces and the uid drop are mandatory (fail closed).  As an
ordinary user the helper tries a user namespace (NEWUSER|NEWNS|NEWNET, mapping
the caller's uid onto itself) and otherwise falls back to rlimits + empty env +
process group; :func:`describe` / ``Popen.isolation`` say what is missing.

The interpreter may live somewhere the sandbox uid cannot traverse (here
``/root/.pyenv``, ``/root`` being 0700).  Inside the private mount namespace the
helper masks the topmost untraversable ancestor with a 0755 tmpfs and binds the
needed trees (interpreter, prefixes, site-packages, project source) back at the
same paths, held by ``O_PATH`` file descriptors while covered.  The same trick
keeps a job directory under ``/tmp`` reachable after ``/tmp`` is replaced.

Known limits (reported by ``describe``): there is no PID namespace, so the
sandbox can see other processes in ``/proc`` (it cannot read a root
supervisor's environment, but in the unprivileged user-namespace mode it runs
as the caller's own uid and could read the caller's ``/proc/PID/environ``);
concurrent sandboxes share the one ``limits.user`` uid; world-readable host
files stay readable.

This module must stay stdlib-only: it runs as the helper with ``-I -S``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import resource
import signal
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

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

_HELPER_EXIT_SETUP = 126
_HELPER_EXIT_EXEC = 127

# linux/sched.h, linux/mount.h, linux/prctl.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
_MOUNT_OPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


class SandboxError(RuntimeError):
    """The sandbox could not be started with the protections it requires."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int  # RLIMIT_AS
    cpu_seconds: int  # RLIMIT_CPU (soft; SIGKILL 5 s later)
    file_bytes: int  # RLIMIT_FSIZE
    max_processes: int  # RLIMIT_NPROC (only applied for the unprivileged uid)
    user: str = "nobody"  # uid/gid to drop to when started as root


# --------------------------------------------------------------------------- helpers


def _is_root() -> bool:
    return os.geteuid() == 0


def _sandbox_ids(limits: SandboxLimits) -> tuple[int, int]:
    """uid/gid the sandbox runs as (the caller's own ids when not root)."""
    if not _is_root():
        return os.geteuid(), os.getegid()
    try:
        pw = pwd.getpwnam(limits.user)
    except KeyError:
        raise SandboxError(f"sandbox user {limits.user!r} does not exist on this host") from None
    if pw.pw_uid == 0:
        raise SandboxError(f"sandbox user {limits.user!r} is uid 0; refusing to run models as root")
    return pw.pw_uid, pw.pw_gid


def sandbox_env(jobdir: Path | str, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of the sandbox child: nothing is inherited."""
    jobdir = str(jobdir)
    env = {
        "PATH": MINIMAL_PATH,
        "HOME": jobdir,
        "LANG": "C.UTF-8",
        "TMPDIR": os.path.join(jobdir, TMPDIR_NAME),
    }
    for key, value in (extra_env or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key:
            raise ValueError(f"invalid environment entry {key!r}")
        env[key] = value
    return env


def prepare_jobdir(jobdir: Path | str, limits: SandboxLimits) -> None:
    """Give the job directory tree to the sandbox uid/gid (when root).

    Symlinks are not followed (``lchown``), so a planted link cannot make the
    supervisor chown something outside the job directory.
    """
    jobdir = Path(jobdir)
    jobdir.mkdir(parents=True, exist_ok=True)
    (jobdir / TMPDIR_NAME).mkdir(exist_ok=True)
    if not _is_root():
        return
    uid, gid = _sandbox_ids(limits)
    os.lchown(jobdir, uid, gid)
    os.chmod(jobdir, 0o700)
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
    """Real paths the sandboxed interpreter needs to read (and the helper to exec)."""
    candidates: list[str] = [
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.abspath(sys.executable)),
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        str(Path(__file__).resolve().parents[1]),  # the project source (worker/, app/)
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
    out: list[str] = []
    for c in candidates:
        if c and os.path.isabs(c) and os.path.isdir(c):
            out.append(os.path.realpath(c))
    return sorted(set(out))


def _plan_mounts(
    jobdir: str, uid: int, gid: int, needed: Sequence[str], tmpfs_bytes: int
) -> dict[str, Any]:
    """Decide which directories get covered by a tmpfs and which trees are bound back.

    Covers: the private tmp dirs; the job directory's parent (hides sibling
    jobs); and, for each needed tree, any ancestor the sandbox uid cannot
    traverse.  A needed tree (or the job directory) that ends up under a cover
    is re-exposed at its own path.  The result is a list of operations in
    path-depth order, so a cover below a re-exposed tree is applied after it.
    """
    gids = {gid}
    needed_set = set(needed) | {jobdir}
    base: dict[str, dict[str, Any]] = {}
    for d in TMP_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            base[os.path.realpath(d)] = {"kind": "tmp", "mode": 0o1777, "size": tmpfs_bytes}
    parent = os.path.dirname(jobdir)
    if parent != "/" and parent not in base:
        base[parent] = {"kind": "mask", "mode": 0o755, "size": MASK_TMPFS_BYTES}
    for p in needed_set:  # a needed tree is never covered itself
        base.pop(p, None)

    def walk(target: str, covers: dict[str, Any], masks: dict[str, Any]) -> bool:
        """State just above `target`: True if fresh (inside a cover, not re-exposed)."""
        fresh = False
        for a in _ancestors(target):
            if a in covers:
                fresh = True
            elif a in needed_set:
                fresh = False  # re-exposed (bound back) or reachable as it is
            if not fresh and not _can_traverse(a, uid, gids):
                masks.setdefault(a, {"kind": "mask", "mode": 0o755, "size": MASK_TMPFS_BYTES})
                fresh = True
        return fresh

    masks: dict[str, Any] = {}
    for p in sorted(needed_set, key=lambda s: (s.count("/"), s)):
        walk(p, {**base, **masks}, masks)
    covers = {c: v for c, v in {**base, **masks}.items() if c not in needed_set}
    # A cover lying inside another cover (and not re-exposed) does not exist there.
    covers = {c: v for c, v in covers.items() if not walk(c, covers, {})}
    ops: list[dict[str, Any]] = [{"op": "cover", "path": c, **v} for c, v in covers.items()]
    for p in needed_set:
        if p == jobdir or walk(p, covers, {}):
            ops.append({"op": "bind", "path": p})
    ops.sort(key=lambda o: (o["path"].count("/"), o["path"]))
    return {"ops": ops}


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
) -> subprocess.Popen:
    """Start ``argv`` isolated in ``jobdir``; return the Popen of the sandbox.

    The returned process leads its own session/process group
    (``os.killpg(proc.pid, SIGKILL)`` kills everything it started) and has an
    ``isolation`` attribute: the dict of protections actually applied (same
    shape as :func:`describe`).  Raises :class:`SandboxError` when a required
    protection (root: namespaces + uid drop) cannot be applied or ``argv`` cannot
    be executed.  ``readable_paths``: further trees the child must read (they
    are re-exposed if an ancestor is untraversable for the sandbox uid).
    """
    if not argv:
        raise ValueError("argv is empty")
    jobdir_s = os.path.realpath(str(jobdir))
    if not os.path.isdir(jobdir_s):
        raise SandboxError(f"job directory {jobdir_s} does not exist")
    if jobdir_s == "/" or jobdir_s in [os.path.realpath(d) for d in TMP_DIRS]:
        raise SandboxError(f"refusing job directory {jobdir_s}")
    root = _is_root()
    uid, gid = _sandbox_ids(limits)
    env = sandbox_env(jobdir_s, extra_env)
    needed = runtime_paths(argv) + [os.path.realpath(str(p)) for p in readable_paths]
    tmpfs_bytes = max(1024 * 1024, min(limits.file_bytes, TMPFS_MAX_BYTES))
    plan = _plan_mounts(jobdir_s, uid, gid, needed, tmpfs_bytes)

    r, w = os.pipe()
    try:
        config = {
            "mode": "root" if root else "user",
            "argv": list(argv),
            "env": env,
            "jobdir": jobdir_s,
            "uid": uid,
            "gid": gid,
            "user": limits.user if root else pwd.getpwuid(uid).pw_name if _has_pw(uid) else str(uid),
            "limits": {
                "memory_bytes": int(limits.memory_bytes),
                "cpu_seconds": int(limits.cpu_seconds),
                "file_bytes": int(limits.file_bytes),
                "max_processes": int(limits.max_processes),
            },
            "plan": plan,
            "parent_pid": os.getpid(),
            "status_fd": w,
        }
        helper = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config), "--", *argv]
        proc = subprocess.Popen(
            helper,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd="/",
            close_fds=True,
            pass_fds=(w,),
            start_new_session=True,
        )
    finally:
        os.close(w)
    try:
        chunks = []
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
    messages = b"".join(chunks).decode("utf-8", "replace").splitlines()
    report: dict[str, Any] | None = None
    error: str | None = None
    for line in messages:
        kind, _, payload = line.partition(" ")
        if kind == "OK":
            report = json.loads(payload)
        elif kind in ("ERR", "EXECFAIL"):
            error = payload
    if error is not None or report is None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _close_pipes(proc)
        raise SandboxError(
            f"sandbox setup failed: {error or f'helper exited with status {proc.returncode} before exec'}"
        )
    proc.isolation = report  # type: ignore[attr-defined]
    return proc


def _has_pw(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _close_pipes(proc: subprocess.Popen) -> None:
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


_DESCRIBE_CACHE: dict[tuple, dict[str, Any]] = {}


def describe(limits: SandboxLimits | None = None, *, refresh: bool = False) -> dict[str, Any]:
    """What isolation this host actually applies, measured by a probe sandbox.

    Runs ``python -I -S -c pass`` through :func:`spawn` in a scratch job
    directory (cached per limits).  Keys: ``mode`` (root / userns / degraded),
    ``network_namespace``, ``mount_namespace``, ``private_tmp``,
    ``readonly_mounts``, ``hidden_paths``, ``user_namespace``, ``uid``/``gid``/
    ``user``, ``uid_dropped``, ``rlimits``, ``no_new_privs``, ``pdeathsig``,
    ``own_process_group``, ``empty_environment``, ``pid_namespace`` and
    ``missing`` (human-readable list of protections not applied).  If the probe
    fails, ``{"mode": "unavailable", "error": ...}``.
    """
    import shutil
    import tempfile

    limits = limits or SandboxLimits(
        memory_bytes=1 << 30, cpu_seconds=10, file_bytes=1 << 20, max_processes=64
    )
    key = (limits, os.geteuid())
    if not refresh and key in _DESCRIBE_CACHE:
        return dict(_DESCRIBE_CACHE[key])
    base = tempfile.mkdtemp(prefix="squeeze-probe-")
    try:
        jobdir = Path(base) / "job"
        prepare_jobdir(jobdir, limits)
        try:
            proc = spawn(
                [sys.executable, "-I", "-S", "-c", "pass"],
                jobdir,
                limits,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except SandboxError as exc:
            return {"mode": "unavailable", "error": str(exc)}
        proc.wait()
        result = dict(proc.isolation)  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _DESCRIBE_CACHE[key] = result
    return dict(result)


# --------------------------------------------------------------------------- helper side
# Everything below runs in the helper process, between fork/exec of the helper
# and execve of the target.  Only stdlib, no threads.


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
    _check(
        libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
        f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x})",
    )


def _mountinfo() -> list[tuple[str, int]]:
    """(mount point, preserved flags) of every mount in this namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = fields[4].encode().decode("unicode_escape")  # \040 etc.
            opts = fields[5].split(",")
            flags = 0
            for opt in opts:
                flags |= _MOUNT_OPT_FLAGS.get(opt, 0)
            if "relatime" not in opts and "noatime" not in opts:
                flags |= MS_STRICTATIME  # keep the atime mode: changing it is refused on locked mounts
            out.append((mp, flags))
    return out


def _setup_mounts(libc, cfg: dict[str, Any], report: dict[str, Any]) -> None:
    plan = cfg["plan"]
    jobdir = cfg["jobdir"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    ops = plan["ops"]
    # Hold every tree that is re-exposed before anything covers it.
    held: dict[str, int] = {}
    for op in ops:
        if op["op"] == "bind":
            held[op["path"]] = os.open(op["path"], os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        for op in ops:
            path = op["path"]
            if op["op"] == "cover":
                opts = f"mode={op['mode']:o},size={int(op['size'])}"
                _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, opts)
            else:
                os.makedirs(path, mode=0o755, exist_ok=True)
                _mount(libc, f"/proc/self/fd/{held[path]}", path, None, MS_BIND | MS_REC)
    finally:
        for fd in held.values():
            os.close(fd)
    report["mount_namespace"] = True
    report["private_tmp"] = sorted(o["path"] for o in ops if o["op"] == "cover" and o["kind"] == "tmp")
    report["hidden_paths"] = sorted(o["path"] for o in ops if o["op"] == "cover" and o["kind"] == "mask")
    report["reexposed_paths"] = sorted(o["path"] for o in ops if o["op"] == "bind" and o["path"] != jobdir)
    # Everything but the job directory, the private tmp dirs and /dev,/proc,/sys read-only.
    writable = [jobdir] + report["private_tmp"]
    failures = []
    for mp, flags in _mountinfo():
        if any(_is_under(mp, w) for w in writable) or any(_is_under(mp, s) for s in ("/dev", "/proc", "/sys")):
            continue
        try:
            _mount(libc, None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue  # hidden under a cover
            if exc.errno == errno.EINVAL and not os.path.ismount(mp):
                continue  # path now resolves into a cover, not to that mount
            failures.append(f"{mp}: {exc.strerror}")
    report["readonly_mounts"] = not failures
    if failures:
        report["missing"].append("read-only remount failed for: " + "; ".join(failures[:5]))


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

    setl("AS", resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"])
    setl("CPU", resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 5)
    setl("FSIZE", resource.RLIMIT_FSIZE, lim["file_bytes"], lim["file_bytes"])
    setl("CORE", resource.RLIMIT_CORE, 0, 0)
    if nproc:
        setl("NPROC", resource.RLIMIT_NPROC, lim["max_processes"], lim["max_processes"])
    else:
        report["missing"].append(
            "RLIMIT_NPROC not applied (it would count all processes of the caller's own uid)"
        )
    report["rlimits"] = applied


def _write_id_maps(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _helper_main(args: list[str]) -> None:
    cfg = json.loads(args[1])
    assert args[2] == "--"
    argv = args[3:]
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)

    def send(kind: str, payload: str) -> None:
        data = f"{kind} {payload}\n".encode()
        while data:
            data = data[os.write(status_fd, data):]

    root = cfg["mode"] == "root"
    report: dict[str, Any] = {
        "mode": "degraded",
        "user_namespace": False,
        "network_namespace": False,
        "mount_namespace": False,
        "private_tmp": [],
        "hidden_paths": [],
        "reexposed_paths": [],
        "readonly_mounts": False,
        "uid": os.geteuid(),
        "gid": os.getegid(),
        "user": cfg["user"],
        "uid_dropped": False,
        "rlimits": {},
        "no_new_privs": False,
        "pdeathsig": False,
        "own_process_group": os.getpgrp() == os.getpid() and os.getsid(0) == os.getpid(),
        "empty_environment": set(os.environ) == set(cfg["env"]),
        "pid_namespace": False,
        "missing": [],
    }
    try:
        libc = _libc()
        if root:
            _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(CLONE_NEWNS|CLONE_NEWNET)")
            report["network_namespace"] = True
            _setup_mounts(libc, cfg, report)
            report["mode"] = "root"
        else:
            try:
                _check(
                    libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET),
                    "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWNET)",
                )
            except OSError as exc:
                report["missing"] += [
                    f"user namespace refused by the kernel ({exc.strerror}): "
                    "no network namespace (network reachable)",
                    "no mount namespace (the child can write wherever the caller's uid can; /tmp is shared)",
                ]
            else:
                report["user_namespace"] = True
                report["network_namespace"] = True
                report["mode"] = "userns"
                _write_id_maps(cfg["uid"], cfg["gid"])
                try:
                    _setup_mounts(libc, cfg, report)
                except OSError as exc:
                    report["missing"].append(f"mount namespace setup failed ({exc}): /tmp shared, host writable")
            report["missing"].append(
                f"no uid drop (not started as root): runs as uid {cfg['uid']} and can read that uid's "
                "/proc/PID/environ of other processes"
            )
        _apply_rlimits(cfg, report, nproc=root)
        if root:
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
            report["uid_dropped"] = True
        report["uid"], report["gid"] = os.geteuid(), os.getegid()
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        report["no_new_privs"] = True
        # After the uid change (which clears it).
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != cfg["parent_pid"]:
            raise OSError(errno.ESRCH, "the spawning process is already gone")
        report["pdeathsig"] = True
        report["missing"].append("no PID namespace: other host processes are visible in /proc")
        os.umask(0o022)
        os.chdir(cfg["jobdir"])
        os.makedirs(cfg["env"]["TMPDIR"], mode=0o700, exist_ok=True)
    except BaseException as exc:  # noqa: BLE001 - any failure means: do not run the target
        send("ERR", f"{type(exc).__name__}: {exc}".replace("\n", " "))
        os._exit(_HELPER_EXIT_SETUP)
    send("OK", json.dumps(report))
    try:
        os.execvpe(argv[0], argv, cfg["env"])
    except OSError as exc:
        send("EXECFAIL", f"cannot execute {argv[0]!r}: {exc}".replace("\n", " "))
    os._exit(_HELPER_EXIT_EXEC)


if __name__ == "__main__":
    _helper_main(sys.argv)
