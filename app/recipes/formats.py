"""Model formats, output formats and runtimes: which outputs each input can become, and which runtimes run
each format."""

from __future__ import annotations

from typing import Literal

ModelFormat = Literal["pt2", "onnx", "package", "hf"]
OutputFormat = Literal["pt2", "onnx", "package", "hf", "safetensors", "gguf"]
Runtime = Literal["torch", "torch-compile", "onnxruntime", "openvino"]

# Which output formats each input format can produce. ONNX cannot go back to a torch graph.
OUTPUTS_BY_INPUT: dict[str, tuple[str, ...]] = {
    "pt2": ("pt2", "onnx", "safetensors"),
    "onnx": ("onnx", "safetensors"),
    "package": ("package", "pt2", "onnx", "safetensors"),
    "hf": ("hf", "pt2", "onnx", "safetensors", "gguf"),  # gguf: causal LMs of the Llama family (docs/llm.md)
}
# The runtime a format naturally runs on, used when evaluate.runtimes is not given.
NATIVE_RUNTIME: dict[str, str] = {"pt2": "torch", "package": "torch", "hf": "torch", "onnx": "onnxruntime"}
# openvino: an ONNX model (or a torch model's fp32 ONNX export, for the original) compiled by OpenVINO for the CPU,
# static shapes per input shape (worker/engine/formats/_openvino.py; the worker extra carries it).
# torch-compile: inductor with static shapes (dynamic=False; a dynamic batch hit an inductor assertion in int8
# conv, bench/RESULTS.md), compiled once per batch size before timing.
RUNTIMES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pt2": ("torch", "torch-compile"),
    "package": ("torch", "torch-compile"),
    "hf": ("torch", "torch-compile"),
    "onnx": ("onnxruntime", "openvino"),
    "safetensors": (),  # a storage format: loaded back into a dense model to run
    "gguf": (),  # llama.cpp's format: reloaded by transformers' GGUF loader to be measured (docs/llm.md)
}
