"""A job directory between the supervisor (privileged) and the sandbox (untrusted) (docs/security.md): given to
the job's uid before it runs, and read back without following anything the job planted."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from worker.isolation import (
    TMPDIR_NAME,
    SandboxError,
    SandboxLimits,
    is_root,
    sandbox_ids,
)


def prepare_jobdir(jobdir: Path | str, limits: SandboxLimits) -> None:
    """Give the job directory tree to the job's uid (when root), mode 0700.

    Symlinks are not followed (``lchown``), so a planted link cannot make the
    supervisor chown something outside the job directory.
    """
    jobdir = Path(jobdir)
    jobdir.mkdir(parents=True, exist_ok=True)
    (jobdir / TMPDIR_NAME).mkdir(exist_ok=True)
    os.chmod(jobdir, 0o700)
    if not is_root():
        return
    uid, gid = sandbox_ids(limits)
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
