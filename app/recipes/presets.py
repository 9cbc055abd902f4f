"""The named recipes `recipe` may be given as (GET /v1/recipes/presets lists them).

Each preset says what it gives, true to what a job measures: `smaller_file` (an output at least 1.05x smaller),
`faster` (a latency gain on the runtime it is timed on, CPU), the output `formats` it writes by default ("input":
the uploaded model's format) and a one-line `note`."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "prune-50": {
        "description": "Global unstructured magnitude pruning to 50% sparsity; writes the input's format and the "
                       "compact safetensors (the smaller file).",
        "gives": {"smaller_file": True, "faster": False, "formats": ["input", "safetensors"],
                  "note": "a smaller file only as the compact safetensors (sparse storage); the dense model runs no "
                          "faster on CPU dense kernels"},
        "recipe": {"version": 1, "steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]},
    },
    "slim-50": {
        "description": "Remove 50% of channels by L2 importance (model packages); outputs .pt2 and ONNX of the "
                       "smaller architecture.",
        "gives": {"smaller_file": True, "faster": True, "formats": ["pt2", "onnx"],
                  "note": "fewer channels: a smaller file and fewer MACs, so faster on any runtime"},
        "recipe": {"version": 1, "steps": [{"type": "prune", "method": "channel", "sparsity": 0.5,
                                            "importance": "l2", "round_to": 8}], "outputs": ["pt2", "onnx"]},
    },
    "int8": {
        "description": "Static int8 (weights and activations, calibrated on the calibration dataset), written as "
                       "ONNX for ONNX Runtime: the fast CPU path.",
        "gives": {"smaller_file": True, "faster": True, "formats": ["onnx"],
                  "note": "about 4x smaller int8 ONNX, faster on ONNX Runtime CPU int8 kernels; calibrates on the "
                          "eval set when no calibration dataset is given"},
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "static_int8"}], "outputs": ["onnx"],
                   "evaluate": {"runtimes": ["onnxruntime"]}},
    },
    "int8-dynamic": {
        "description": "Dynamic int8 (int8 weights, activations quantized per batch; no calibration data), written "
                       "as ONNX: for Linear/LSTM-heavy models such as transformers.",
        "gives": {"smaller_file": True, "faster": True, "formats": ["onnx"],
                  "note": "int8 weights (about 4x smaller Linear/LSTM layers); faster on Linear-heavy models, "
                          "little gain on convolutions"},
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "dynamic_int8"}], "outputs": ["onnx"],
                   "evaluate": {"runtimes": ["onnxruntime"]}},
    },
    "int4-weights": {
        "description": "torchao int4 weight-only quantization in groups of 128 (model packages): a memory and "
                       "storage saving, not a CPU speed-up.",
        "gives": {"smaller_file": True, "faster": False, "formats": ["package"],
                  "note": "int4 weights in a model package: memory and storage, not CPU speed"},
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "weight_int4", "group_size": 128}],
                   "outputs": ["package"]},
    },
    "slim-50-distill": {
        "description": "Remove 50% of channels (model packages, Hugging Face folders), win the accuracy back by "
                       "distilling from the original for 3 epochs (needs a labelled train dataset), then static "
                       "int8 as ONNX for ONNX Runtime.",
        "gives": {"smaller_file": True, "faster": True, "formats": ["onnx"],
                  "note": "fewer channels then int8 ONNX: smaller and faster on ONNX Runtime; needs a labelled "
                          "train dataset"},
        "recipe": {"version": 1, "steps": [
            {"type": "prune", "method": "channel", "sparsity": 0.5, "importance": "l2", "round_to": 8},
            {"type": "distill", "teacher": "original", "dataset": "train", "epochs": 3, "lr": 3e-3,
             "schedule": "cosine", "temperature": 4, "alpha": 0.7},
            {"type": "quantize", "method": "static_int8"}], "outputs": ["onnx"],
            "evaluate": {"runtimes": ["onnxruntime"]}},
    },
    "llm-int4": {
        "description": "Hugging Face causal LMs: GPTQ int4 weights (W4A16) in groups of 128 (or the largest of "
                       "64/32 that fits the layers), calibrated on the calibration text, written as a "
                       "compressed-tensors folder (vLLM, transformers); judged by perplexity on the eval text.",
        "gives": {"smaller_file": True, "faster": False, "formats": ["hf"],
                  "note": "int4 decoder weights (about 3.5x smaller linear layers; embeddings stay 16-bit): memory "
                          "and storage; faster only on a runtime with int4 kernels (vLLM on GPU)"},
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "weight_int4", "algorithm": "gptq"}],
                   "outputs": ["hf"]},
    },
    "llm-w8a8": {
        "description": "Hugging Face causal LMs: SmoothQuant then GPTQ to int8 weights and activations (W8A8), "
                       "written as a compressed-tensors folder for vLLM's int8 kernels.",
        "gives": {"smaller_file": True, "faster": False, "formats": ["hf"],
                  "note": "int8 weights and activations: about 2x smaller linear layers; faster on vLLM's int8 "
                          "kernels, not in transformers on CPU (it decompresses)"},
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "w8a8"}], "outputs": ["hf"]},
    },
    "palette-16": {
        "description": "Weight sharing: 16 clusters per layer, stored as codebook + 4-bit indices (safetensors).",
        "gives": {"smaller_file": True, "faster": False, "formats": ["safetensors"],
                  "note": "codebook + 4-bit indices in safetensors: a smaller file, run as a dense model"},
        "recipe": {"version": 1, "steps": [{"type": "cluster", "clusters": 16}], "outputs": ["safetensors"]},
    },
}
