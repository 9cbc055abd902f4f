"""The report's flags, each with a one-line reason: what about the result a reader must not miss.

`no_size_reduction`: no output the job wrote (the compact safetensors included) is MEANINGFUL_GAIN smaller.
`no_speedup`: no latency ratio (same runtime, any batch size) reaches MEANINGFUL_GAIN with the result's p90 under
the original's median: a gain inside the run-to-run noise is no gain.
`calibrated_on_eval`: static int8 calibrated on the eval set, the data that measures accuracy.
"""

from __future__ import annotations

from typing import Any

from worker.engine.metrics import MEANINGFUL_GAIN


def _same_shape(step: dict) -> bool:
    """A step that keeps every matrix's shape (unstructured or N:M zeros, shared weights): dense CPU kernels
    multiply the zeros anyway, and only the compact storage makes the file smaller."""
    return step.get("type") == "cluster" or (step.get("type") == "prune" and step.get("method") != "channel")


def flag_reasons(measured: dict, steps: list[dict], outputs: list[str]) -> dict[str, str]:
    """{flag: one-line reason}, in the order a reader should see them, from the metrics (original, compressed,
    ratios, size_ratio_output), the steps' reports and the outputs written."""
    ratios, original, compressed = measured["ratios"], measured["original"], measured["compressed"]
    reasons: dict[str, str] = {}
    size = _size_reason(ratios, measured.get("size_ratio_output"), steps, outputs)
    if size:
        reasons["no_size_reduction"] = size
    speed = _speed_reason(ratios, original, compressed, steps)
    if speed:
        reasons["no_speedup"] = speed
    if any(s.get("calibration_dataset") == "eval" for s in steps):
        reasons["calibrated_on_eval"] = ("static int8 calibrated on the eval set, the data that measures accuracy, "
                                         "so the figures may flatter the result: give a calibration dataset")
    return reasons


def _size_reason(ratios: dict, where: str | None, steps: list[dict], outputs: list[str]) -> str | None:
    best = ratios.get("size")
    if best is not None and best >= MEANINGFUL_GAIN:
        return None
    best_text = f"{where or 'none'} at {best:.2f}x" if best is not None else "none"
    line = f"no output is {MEANINGFUL_GAIN}x smaller than the original (best: {best_text})"
    if any(_same_shape(s) for s in steps) and "safetensors" not in outputs:
        return line + "; zeros and shared weights shrink the file only in the compact storage: add safetensors " \
                      "to outputs"
    return line


def _speed_reason(ratios: dict, original: dict, compressed: dict, steps: list[dict]) -> str | None:
    latency = ratios.get("latency") or {}
    points = [(r, rt, b) for rt, by_batch in latency.items() for b, r in by_batch.items() if r is not None]
    if not points:
        return "no runtime timed both the original and the result, so no speed-up was measured"
    if any(_clear_gain(r, rt, b, original, compressed) for r, rt, b in points):
        return None
    best, rt, b = max(points)
    if best >= MEANINGFUL_GAIN:  # fast enough on paper, but the result's p90 is not under the original's median
        line = f"the best, {best:.2f}x on {rt} at batch {b}, is within run-to-run noise"
    else:
        line = f"no runtime runs the result {MEANINGFUL_GAIN}x faster (best: {best:.2f}x on {rt} at batch {b})"
    if steps and all(_same_shape(s) for s in steps):
        return line + "; unstructured zeros and shared weights run on the same dense CPU kernels: channel " \
                      "pruning or int8 make a model faster"
    return line


def _clear_gain(ratio: float, runtime: str, batch: str, original: dict[str, Any], compressed: dict[str, Any]) -> bool:
    if ratio < MEANINGFUL_GAIN:
        return False
    before = (original.get("latency_ms") or {}).get(runtime, {}).get(batch) or {}
    after = (compressed.get("latency_ms") or {}).get(runtime, {}).get(batch) or {}
    return after.get("p90") is None or before.get("median") is None or after["p90"] < before["median"]
