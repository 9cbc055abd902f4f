"""What an llm-compressor run is watched by: the process's peak RSS growth, and progress per decoder layer."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections.abc import Callable, Iterator
from typing import Self

import torch


class PeakRss:
    """Peak resident memory growth over a block: current RSS sampled every 20 ms from /proc/self/statm, and the
    process's ru_maxrss when it rose during the block (then it is exactly this block's peak)."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._max_before = _maxrss()
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # no procfs: the ru_maxrss rise alone gives the peak
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        max_after = _maxrss()
        self.peak = max(self.peak, self._rss(), max_after if max_after > self._max_before else 0)

    @property
    def growth_mb(self) -> float:
        return round(max(self.peak - self.start, 0) / 2**20, 1)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module, passes: int, progress: Callable[[float, str], None]) -> Iterator[None]:
    """Report progress as calibration moves from one decoder layer to the next (forward pre-hooks on the layers
    llm-compressor's sequential pipeline calibrates one at a time); removed on exit."""
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    try:
        layers = [m for _, m in match_named_modules(model, infer_sequential_targets(model))]
    except Exception:  # noqa: BLE001 - progress is best effort; an unknown layout just reports start and end
        layers = []
    total = max(1, len(layers) * passes)
    state = {"last": None, "steps": 0}

    def hook(index: int):
        def fire(_module, args, kwargs):
            first = args[0] if args else kwargs.get("hidden_states")
            if isinstance(first, torch.Tensor) and state["last"] != index:
                state["last"], state["steps"] = index, state["steps"] + 1
                progress(min(state["steps"] / total, 1.0) * 0.95, f"calibrating layer {index + 1}/{len(layers)}")
        return fire

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
