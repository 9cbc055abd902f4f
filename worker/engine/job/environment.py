"""What a rerun needs to explain a difference: hardware, threads and the version of every library used."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

_LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "safetensors", "torch-pruning", "torchao",
              "transformers", "matplotlib")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, timing_threads: int) -> dict[str, Any]:
    """Threads: the sandbox's, and those each runtime got while timed."""
    from importlib import metadata

    import torch

    versions = {}
    for dist in _LIBRARIES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "gpu": gpu, "threads": threads, "timing_threads": timing_threads,
            "libraries": versions,
            # kept at the top level for earlier readers of the report
            "torch": torch.__version__, "onnx": versions["onnx"], "onnxruntime": versions["onnxruntime"],
            "numpy": versions["numpy"]}
