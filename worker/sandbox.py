"""Entry point of the untrusted side: `python -I -m worker.sandbox JOBDIR`.

Runs with an empty environment inside the supervisor's limits. Runs the job in JOBDIR (worker/engine/job: reads
JOBDIR/job.json, loads the model, evaluates it, applies the recipe, writes the result in each output format plus
report.json to JOBDIR/out/), and speaks JSON lines on stdout (the protocol channel):

  {"type": "progress", "progress": 0..1, "stage": str, "message": str}
  {"type": "event", "name": "step_done", "data": {...step report...}}
  {"type": "result", "metrics": {...}, "artifacts": [{name, format, path}], "engine_seconds": float}
  {"type": "error", "code": str, "message": str}

Exit status: 0 success, 2 a user-side failure (bad_model, bad_dataset, no_effect, unsupported),
1 an internal error (code "internal"; the traceback goes to stderr).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from worker.engine.finite import finite

# Progress fraction at the start of each stage; a stage reports within [start, next start).
_STAGE_SPAN = {"load": (0.0, 0.05), "evaluate_original": (0.05, 0.25), "steps": (0.25, 0.6),
               "write": (0.6, 0.75), "evaluate_result": (0.75, 0.98), "report": (0.98, 1.0)}


def take_protocol_channel() -> IO[str]:
    """Keep a private copy of fd 1 for protocol lines and point fd 1 at stderr.

    Done before anything else runs, so a print() in user model code (or a library) lands on stderr and
    can never forge a protocol line.
    """
    sys.stdout.flush()
    private = os.dup(1)  # os.dup makes a non-inheritable fd: child processes do not get the channel
    os.dup2(2, 1)
    return os.fdopen(private, "w", encoding="utf-8", buffering=1)


class Channel:
    def __init__(self, stream: IO[str]):
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self.stream.write(json.dumps(finite(message), allow_nan=False, default=str) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        key = "steps" if stage.startswith("steps[") else stage
        start, end = _STAGE_SPAN[key]
        value = start + (end - start) * min(max(fraction, 0.0), 1.0)
        self.send({"type": "progress", "progress": round(value, 4), "stage": stage, "message": message})


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kind):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def warm_up(channel: Channel) -> bool:
    """`--warm`: import what every job needs, say `ready`, then wait for the supervisor's `go` on stdin (the job
    is staged meanwhile). False when the supervisor closed stdin instead: this sandbox is thrown away unused.
    A warm sandbox runs one job only (worker/warm.py)."""
    import matplotlib
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: F401  (report.png; its first import builds a font cache: ~1 s)

    import worker.engine.job  # noqa: F401  (the job's stages, and through them the formats, passes and metrics)
    import worker.engine.report_plot  # noqa: F401

    channel.send({"type": "ready"})
    return sys.stdin.readline().strip() == "go"


def main(argv: list[str] | None = None) -> int:
    channel = Channel(take_protocol_channel())
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--warm"]:
        argv = argv[1:]
        if not warm_up(channel):
            return 0
    if len(argv) != 1:
        channel.send({"type": "error", "code": "internal",
                      "message": "usage: python -m worker.sandbox [--warm] JOBDIR"})
        return 1
    try:
        from worker.engine.errors import EngineError
        from worker.engine.job import run_job
    except BaseException as exc:  # noqa: BLE001  (a broken install must still answer on the channel)
        traceback.print_exc()
        channel.send({"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    try:
        result = run_job(Path(argv[0]), channel)
    except EngineError as exc:
        # Out of memory under the sandbox's limit is the limit's doing, whichever step ran into it.
        code = "resource_limit" if _caused_by(exc, MemoryError) else exc.code
        channel.send({"type": "error", "code": code, "message": exc.message})
        return 2
    except MemoryError:
        channel.send({"type": "error", "code": "resource_limit", "message": "out of memory under the sandbox limit"})
        return 2
    except BaseException as exc:  # noqa: BLE001  (user code may raise SystemExit; report it, don't vanish)
        traceback.print_exc()
        channel.send({"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {str(exc)[:2000]}"})
        return 1
    channel.send(result)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every output is written and closed and the result sent: skip the interpreter's teardown of torch and
    # ONNX Runtime (about 0.5 s on the bench host), which only delays the job's end.
    os._exit(status)
