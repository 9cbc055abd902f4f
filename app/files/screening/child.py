"""Screening an upload in a child process (`python -S -m app.files.screening`), with a time budget: hostile bytes
are read off the API's event loop and thread pool, by a process that can be killed."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Literal

from app.files.screening.common import ScreeningError, Sniffed
from app.files.screening.models import sniff_model
from app.files.screening.npz import sniff_dataset

SCREENERS = {"model": sniff_model, "dataset": sniff_dataset}
# The folder holding the `app` package: the child's cwd, so that `python -m app.files.screening` finds it without any
# environment (the child gets none: it reads hostile bytes and needs no credentials).
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]


_SLOTS: dict[Any, Any] = {}  # event loop -> asyncio.Semaphore of the screenings it may run at once


def _slots(concurrency: int):
    """This event loop's semaphore (a Semaphore binds to the loop that first waits on it; tests run several)."""
    import asyncio

    loop = asyncio.get_running_loop()
    for other in [lp for lp in _SLOTS if lp.is_closed()]:
        del _SLOTS[other]
    return _SLOTS.setdefault(loop, asyncio.Semaphore(concurrency))


def _memory(limit_bytes: int) -> ScreeningError:
    return ScreeningError(
        413, "screening_memory",
        f"screening the upload needed more than {limit_bytes / 2**20:g} MiB of memory (the server's "
        "SQUEEZE_SCREENING_MEMORY_BYTES) and it was not stored; upload smaller JSON files (configs, .pt2 payloads) or "
        "ask the operator to raise the limit", {"memory_bytes": limit_bytes})


def _timeout(timeout_s: float) -> ScreeningError:
    return ScreeningError(
        422, "screening_timeout",
        f"the upload could not be screened within {timeout_s:g} s (the server's SQUEEZE_SCREENING_TIMEOUT_S) and was "
        "not stored; upload a smaller or simpler file (fewer archive entries, no nested archives), or ask the "
        "operator to raise the limit", {"timeout_s": timeout_s})


async def screen(kind: Literal["model", "dataset"], path: Path, *, max_unpacked_bytes: int, max_entries: int,
                 timeout_s: float, memory_bytes: int = 1 << 30, concurrency: int = 4) -> Sniffed:
    """sniff_model / sniff_dataset in a child process, off the API's event loop and thread pool: killed (and the
    upload refused with `screening_timeout`) past timeout_s, or when the request is canceled; its private memory
    capped at memory_bytes (`screening_memory`); at most `concurrency` children at once per event loop."""
    async with _slots(concurrency):
        return await _screen_in_child(kind, path, max_unpacked_bytes, max_entries, timeout_s, memory_bytes)


async def _screen_in_child(kind: str, path: Path, max_unpacked_bytes: int, max_entries: int, timeout_s: float,
                           memory_bytes: int) -> Sniffed:
    import asyncio  # here: the child never needs it (40 ms less per upload)

    # -S: no site-packages, the child runs on the standard library alone (and starts 30 ms sooner).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-S", "-m", "app.files.screening", kind, str(Path(path).resolve()), str(max_unpacked_bytes),
        str(max_entries), str(math.ceil(timeout_s) + 1), str(memory_bytes),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=_PACKAGE_ROOT, env={})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        raise _timeout(timeout_s) from None
    except BaseException:  # canceled: the child goes too (the event loop reaps it)
        _kill(proc)
        raise
    return _child_result(proc.returncode, out, err)


def _kill(proc: Any) -> None:  # an asyncio.subprocess.Process
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:  # exited meanwhile
            pass


def _child_result(returncode: int | None, out: bytes, err: bytes) -> Sniffed:
    try:
        result = json.loads(out) if returncode == 0 else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        tail = err.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"screening child exited with {returncode}: {tail}")
    if "error" in result:
        e = result["error"]
        raise ScreeningError(e["status"], e["code"], e["message"], e["details"])
    return Sniffed(result["kind"], result["details"])


def child_main(argv: list[str]) -> int:
    """`python -m app.files.screening KIND PATH MAX_UNPACKED_BYTES MAX_ENTRIES CPU_S MEMORY_BYTES`: one JSON object on
    stdout, the Sniffed or the ScreeningError. CPU_S caps its CPU time should the parent die before it can kill the
    child; MEMORY_BYTES its private memory (RLIMIT_DATA)."""
    kind, path, max_unpacked, max_entries, cpu_s, memory = argv
    _limit(resource.RLIMIT_CPU, int(cpu_s), int(cpu_s) + 1)
    _limit(resource.RLIMIT_DATA, int(memory), int(memory))
    try:
        sniffed = SCREENERS[kind](Path(path), max_unpacked_bytes=int(max_unpacked), max_entries=int(max_entries))
        result: dict[str, Any] = {"kind": sniffed.kind, "details": sniffed.details}
    except MemoryError:
        exc = _memory(int(memory))
        result = {"error": {"status": exc.status, "code": exc.code, "message": exc.message, "details": exc.details}}
    except ScreeningError as exc:
        result = {"error": {"status": exc.status, "code": exc.code, "message": exc.message, "details": exc.details}}
    sys.stdout.write(json.dumps(result, default=str))
    return 0


def _limit(which: int, soft: int, hard: int) -> None:
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):  # a lower hard limit is already set: it stands
        pass
