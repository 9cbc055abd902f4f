"""What a recipe can do with a given input format: the outputs it will write, or errors for what it cannot."""

from __future__ import annotations

from typing import Any

from app.recipes.formats import OUTPUTS_BY_INPUT, RUNTIMES_BY_FORMAT
from app.recipes.parse import RecipeError
from app.recipes.recipe import Recipe
from app.recipes.steps import (
    CHANGES_ARCHITECTURE,
    EAGER_FORMATS,
    EAGER_ONLY,
    FIXED_ARCHITECTURE_OUTPUTS,
    TRAINABLE,
    TRAINABLE_FORMATS,
    ChannelPruneSpec,
    ClusterSpec,
    PruneSpec,
    QuantizeSpec,
)

# What a quantized model can be written as, by method and input format, and why not otherwise.
QUANTIZE_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "static_int8": {"pt2": ("onnx", "pt2"), "package": ("onnx", "pt2"), "hf": ("onnx", "pt2"), "onnx": ("onnx",)},
    "dynamic_int8": {"pt2": ("onnx",), "package": ("onnx", "package"), "hf": ("onnx",), "onnx": ("onnx",)},
    # A Hugging Face causal LM: llm-compressor's compressed-tensors folder (vLLM) or GGUF (llama.cpp).
    "weight_int8": {"package": ("package",), "hf": ("hf", "gguf")},
    "weight_int4": {"package": ("package",), "hf": ("hf", "gguf")},
    "w8a8": {"hf": ("hf",)},
    "fp8": {"hf": ("hf",)},
    "binary": OUTPUTS_BY_INPUT,
}
_QUANTIZE_WHY = {
    "static_int8": "static int8 runs as a graph with int8 kernels: ask for onnx (ONNX Runtime, the fast CPU path) "
                   "or pt2 (PT2E, for torch.compile)",
    "dynamic_int8": "dynamic int8 is written as ONNX (ONNX Runtime dynamic quantization) or, for a model package, "
                    "as a package of int8 weights: ask for onnx",
    "weight_int8": "torchao weight-only int8 is stored in a model package (exported to ONNX it comes out fp32): "
                   "ask for package",
    "weight_int4": "torchao weight-only int4 is stored in a model package (exported to ONNX it comes out fp32): "
                   "ask for package",
    "w8a8": "W8A8 (SmoothQuant) is written as a compressed-tensors Hugging Face folder: ask for hf",
    "fp8": "fp8 is written as a compressed-tensors Hugging Face folder: ask for hf",
}
_HF_WEIGHT_WHY = "on a Hugging Face causal LM, weight-only quantization is written as a compressed-tensors folder " \
                 "(hf, for vLLM and transformers) or GGUF (gguf, for llama.cpp)"


def quantize_default_outputs(recipe: Recipe, model_format: str) -> list[str] | None:
    """The outputs a quantize step implies when the recipe names none (its method's natural form), else None."""
    step = next((s for s in recipe.steps if isinstance(s, QuantizeSpec)), None)
    if step is None or recipe.outputs:
        return None
    if step.method == "binary":
        return ["safetensors"]  # the packed sign bits: any other form stores the decoded float weights
    possible = QUANTIZE_OUTPUTS[step.method].get(model_format, ())
    return [model_format] if model_format in possible else ["onnx"]


def compact_default_outputs(recipe: Recipe, model_format: str) -> list[str] | None:
    """The outputs an unstructured prune or cluster step implies when the recipe names none: the input's own
    format and the compact safetensors (zeros and shared weights only shrink the file when stored compactly),
    else None."""
    if recipe.outputs or any(isinstance(s, (QuantizeSpec, *CHANGES_ARCHITECTURE)) for s in recipe.steps):
        return None
    if any(isinstance(s, (PruneSpec, ClusterSpec)) for s in recipe.steps):
        return [model_format, "safetensors"]
    return None


def _quantize_errors(recipe: Recipe, model_format: str, outputs: list[str]) -> list[dict[str, str]]:
    errors = []
    quant = [(i, s) for i, s in enumerate(recipe.steps) if isinstance(s, QuantizeSpec)]
    for i, step in quant:
        if i != len(recipe.steps) - 1:
            errors.append({"field": f"steps[{i}]", "message": "quantize must be the last step (a later step would "
                                                              "train or edit the float weights again)"})
        field = f"steps[{i}].method"
        possible = QUANTIZE_OUTPUTS[step.method].get(model_format)
        if possible is None:
            if step.method in ("w8a8", "fp8"):
                message = f"{step.method} is for Hugging Face causal LMs (upload the model's folder), not {model_format}"
            else:
                message = (f"{step.method} (torchao) needs an eager model: upload a model package (zip of model.py "
                           f"with build_model() + weights.safetensors), not {model_format}; for ONNX or .pt2 models "
                           "use static_int8 or dynamic_int8")
            errors.append({"field": field, "message": message})
            continue
        if step.algorithm not in (None, "rtn") and model_format != "hf":
            errors.append({"field": f"steps[{i}].algorithm", "message": f"{step.algorithm} is for Hugging Face "
                           f"causal LMs (llm-compressor); on {model_format} weight quantization rounds to nearest"})
        why = _HF_WEIGHT_WHY if model_format == "hf" and step.method.startswith("weight_") \
            else _QUANTIZE_WHY.get(step.method, "")
        for j, fmt in enumerate(outputs):
            if fmt not in possible and fmt in OUTPUTS_BY_INPUT[model_format]:
                errors.append({"field": f"outputs[{j}]", "message": f"steps[{i}]: {why}; "
                                                                    f"possible outputs: {list(possible)}"})
    return errors


def check_against_format(recipe: Recipe, model_format: str) -> list[str]:
    """The output formats the job will write, or RecipeError for what the input format cannot do."""
    allowed = OUTPUTS_BY_INPUT[model_format]
    reshaped = [i for i, step in enumerate(recipe.steps) if isinstance(step, CHANGES_ARCHITECTURE)]
    head_pruned = [i for i, step in enumerate(recipe.steps) if isinstance(step, ChannelPruneSpec) and step.heads > 0]
    # After a structural change the input's own form no longer fits: default to graph formats.
    graph_outputs = (reshaped and model_format == "package") or (head_pruned and model_format == "hf")
    outputs = list(recipe.outputs or quantize_default_outputs(recipe, model_format)
                   or compact_default_outputs(recipe, model_format)
                   or (["pt2", "onnx"] if graph_outputs else [model_format]))
    errors = [
        {"field": f"steps[{i}]", "message": f"{EAGER_ONLY[type(step)]} needs an eager model: upload a model package "
                                            f"(zip of model.py with build_model() + weights.safetensors) or a "
                                            f"Hugging Face folder (zip of config.json + safetensors), "
                                            f"not {model_format}"}
        for i, step in enumerate(recipe.steps) if type(step) in EAGER_ONLY and model_format not in EAGER_FORMATS
    ]
    errors += [
        {"field": f"steps[{i}]", "message": f"{TRAINABLE[type(step)]} needs a model that can train: a model package, "
                                            f"a Hugging Face folder or a .pt2 (ONNX Runtime cannot train), not "
                                            f"{model_format}"}
        for i, step in enumerate(recipe.steps) if type(step) in TRAINABLE and model_format not in TRAINABLE_FORMATS
    ]
    for fmt in FIXED_ARCHITECTURE_OUTPUTS:
        if reshaped and fmt in outputs:
            errors.append({"field": f"outputs[{outputs.index(fmt)}]",
                           "message": f"steps[{reshaped[0]}] changes the architecture, so the input's build_model() "
                                      f"no longer fits weights stored as {fmt}: ask for pt2 or onnx"})
    errors += [{"field": f"steps[{i}].heads", "message": "attention-head pruning is for Hugging Face transformers "
                                                          f"(upload a Hugging Face folder), not {model_format}"}
               for i in head_pruned if model_format == "package"]
    if head_pruned and "hf" in outputs:
        errors.append({"field": f"outputs[{outputs.index('hf')}]",
                       "message": f"steps[{head_pruned[0]}] removes attention heads, which a Hugging Face config "
                                  "cannot describe (one num_attention_heads, head size = hidden_size / heads): "
                                  "ask for pt2 or onnx"})
    errors += [
        {"field": f"outputs[{i}]", "message": f"a {model_format} model cannot be written as {fmt}; "
                                               f"possible outputs: {list(allowed)}"}
        for i, fmt in enumerate(outputs) if fmt not in allowed
    ]
    errors += [{"field": f"steps[{i}].method", "message": f"{step.method} prunes Hugging Face causal LMs layer by "
                f"layer from calibration text (llm-compressor), not {model_format}: use method magnitude"}
               for i, step in enumerate(recipe.steps)
               if isinstance(step, PruneSpec) and step.method != "magnitude" and model_format != "hf"]
    errors += _quantize_errors(recipe, model_format, outputs)
    if recipe.evaluate.runtimes:
        possible = {rt for fmt in [model_format, *outputs] for rt in RUNTIMES_BY_FORMAT.get(fmt, ())}
        errors += [
            {"field": f"evaluate.runtimes[{i}]", "message": f"no {rt} model in this job (formats: "
                                                            f"{sorted({model_format, *outputs})})"}
            for i, rt in enumerate(recipe.evaluate.runtimes) if rt not in possible
        ]
    guard_runtime = recipe.guard.runtime if recipe.guard else None
    job_runtimes = {rt for fmt in [model_format, *outputs] for rt in RUNTIMES_BY_FORMAT.get(fmt, ())}
    if guard_runtime and guard_runtime not in (recipe.evaluate.runtimes or job_runtimes):
        errors.append({"field": "guard.runtime", "message": f"{guard_runtime} is not timed in this job (runtimes: "
                                                            f"{sorted(recipe.evaluate.runtimes or job_runtimes)})"})
    if errors:
        raise RecipeError(errors)
    return outputs


def teacher_model_ids(recipe: dict[str, Any]) -> list[str]:
    """The uploaded models a stored recipe's distill steps learn from ("original" is the job's own model). Reads the
    job row's JSON as it is: a claim or a delete must not fail on a row whose recipe no longer validates."""
    return [step["teacher"] for step in recipe.get("steps", [])
            if step.get("type") == "distill" and step.get("teacher") not in (None, "original")]
