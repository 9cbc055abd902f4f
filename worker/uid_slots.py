"""One uid per running sandbox (docs/security.md): a job's files, its RLIMIT_NPROC and its signals are its own.

A worker run as root takes a free slot from a configured range (``SQUEEZE_SANDBOX_UID_FIRST`` and
``SQUEEZE_SANDBOX_UID_COUNT``) by holding an exclusive ``flock`` on ``<lock_dir>/<uid>.lock`` for the job's
whole run; every worker process of the host shares the lock folder, so no two live jobs share a uid. Before a
slot is handed out and after its job, any process still running as that uid is killed and reported: with a PID
namespace nothing should be left, and this check proves it on every path.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class NoFreeSlot(RuntimeError):
    """Every uid of the range is held by a running job."""


def processes_of(uid: int) -> list[int]:
    """Pids of live (not zombie) processes whose real uid is ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        real_uid = int(fields.get("Uid", "-1 ").split()[0])
        if real_uid == uid and not fields.get("State", "").strip().startswith(("Z", "X")):
            found.append(int(entry))
    return found


def kill_processes_of(uid: int, timeout: float = 5.0, grace: float = 0.0) -> list[int]:
    """SIGKILLs every process of ``uid`` until none is left; returns the pids that had to be killed. ``grace``:
    seconds to let processes already being torn down (a PID namespace whose init died) end on their own first."""
    killed: list[int] = []
    settle = time.monotonic() + grace
    while processes_of(uid) and time.monotonic() < settle:
        time.sleep(0.02)
    deadline = time.monotonic() + timeout
    while pids := processes_of(uid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of uid {uid} survive SIGKILL: {pids}")
        time.sleep(0.05)
    return killed


@contextmanager
def slot(first: int, count: int, lock_dir: Path) -> Iterator[int]:
    """Holds a free uid of ``first .. first+count-1`` for the ``with`` block."""
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for uid in range(first, first + count):
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            kill_processes_of(uid)  # a worker that died mid-job may have left its sandbox behind
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise NoFreeSlot(f"all {count} sandbox uids from {first} are in use: raise SQUEEZE_SANDBOX_UID_COUNT to at "
                     "least the number of job slots on this host")
