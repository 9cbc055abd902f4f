"""The deploy recommendation in `squeeze compress` / `squeeze jobs show` (metrics.recommendation, issue 19): one
line per batch size under the table, within 80 columns; nothing from a server that sends none."""

from __future__ import annotations

import io

from rich.console import Console
from squeeze_client.cli.summary import print_results, recommendation_lines

from tests.client.test_cli import _job, _measured

RECOMMENDATION = {
    "32": {"runtime": "openvino", "format": "onnx", "model": "result", "latency_ms": 4.1512,
           "runner_up": {"runtime": "onnxruntime", "format": "onnx", "model": "result", "latency_ms": 5.1}},
    "1": {"runtime": "onnxruntime", "format": "onnx", "model": "result", "latency_ms": 0.3123,
          "runner_up": {"runtime": "openvino", "format": "onnx", "model": "original", "latency_ms": 0.4}},
    "8": {"runtime": "torch-compile", "format": "safetensors", "model": "original", "latency_ms": 1234.5678,
          "runner_up": None},
}


def test_one_line_per_batch_size_within_80_columns():
    lines = recommendation_lines({"recommendation": RECOMMENDATION})
    assert lines == ["b1 fastest: onnxruntime, onnx (result) 0.312 ms; next: openvino, onnx 0.4 ms",
                     "b8 fastest: torch-compile, safetensors (original) 1235 ms",
                     "b32 fastest: openvino, onnx (result) 4.15 ms; next: onnxruntime, onnx 5.1 ms"]
    job = _job(status="succeeded", progress=1.0, stage="report",
               metrics={**_measured(), "recommendation": RECOMMENDATION})
    out = io.StringIO()
    print_results(Console(file=out, width=80, color_system=None, soft_wrap=True, markup=False), job, None)
    text = out.getvalue()
    assert all(f"  {line}\n" in text for line in lines)
    assert max(len(line) for line in text.splitlines()) <= 80


def test_no_recommendation_prints_nothing():
    assert recommendation_lines(_measured()) == recommendation_lines(None) == []
    assert recommendation_lines({"recommendation": "garbled"}) == []
