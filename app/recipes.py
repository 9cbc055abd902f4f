"""Recipe schema and presets. Pydantic only: shared by the API (validation at submit) and the worker.

A recipe is a list of steps (a discriminated union on `type`), the output formats and how to
evaluate. Adding a technique means one spec here and one registered pass in worker/engine/passes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

ModelFormat = Literal["pt2", "onnx", "package", "hf"]
OutputFormat = Literal["pt2", "onnx", "package", "hf", "safetensors"]
Runtime = Literal["torch", "onnxruntime"]

# Which output formats each input format can produce. ONNX cannot go back to a torch graph.
OUTPUTS_BY_INPUT: dict[str, tuple[str, ...]] = {
    "pt2": ("pt2", "onnx", "safetensors"),
    "onnx": ("onnx", "safetensors"),
    "package": ("package", "pt2", "onnx", "safetensors"),
    "hf": ("hf", "pt2", "onnx", "safetensors"),
}
# The runtime a format naturally runs on, used when evaluate.runtimes is not given.
NATIVE_RUNTIME: dict[str, str] = {"pt2": "torch", "package": "torch", "hf": "torch", "onnx": "onnxruntime"}
RUNTIMES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pt2": ("torch",),
    "package": ("torch",),
    "hf": ("torch",),
    "onnx": ("onnxruntime",),
    "safetensors": (),  # a storage format: loaded back into a dense model to run
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepSpec(Strict):
    """Fields every step has: which modules/parameters it applies to (fnmatch patterns on names)."""

    targets: list[str] | None = Field(
        None, description="Only parameters whose name matches one of these patterns (default: all eligible)."
    )
    ignore: list[str] = Field(default_factory=list, description="Parameters whose name matches are left alone.")


class PruneSpec(StepSpec):
    """Magnitude pruning: zero the smallest weights (unstructured, or N:M along the input dimension)."""

    type: Literal["prune"] = "prune"
    method: Literal["magnitude"] = "magnitude"
    sparsity: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Fraction of eligible weights set to zero. Required for `unstructured`; for an N:M pattern "
                    "it is implied (1 - N/M) and, if given, must equal it.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one threshold over all eligible weights; layer: each layer pruned to `sparsity`.")
    pattern: Literal["unstructured", "1:2", "2:4", "4:8", "1:4"] = Field(
        "unstructured", description="N:M keeps N of every M consecutive weights along the input dimension "
                                    "(2:4 is what sparse tensor cores run).")

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> "PruneSpec":
        if self.pattern == "unstructured":
            if self.sparsity is None:
                raise ValueError("sparsity is required for unstructured pruning")
        else:
            n, m = (int(v) for v in self.pattern.split(":"))
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {self.pattern} means sparsity {implied:g}; leave sparsity out or set it so")
            self.sparsity = implied
        return self


class ChannelPruneSpec(StepSpec):
    """Structural pruning: remove whole channels/features (and attention heads), so the model really shrinks."""

    type: Literal["prune"] = "prune"
    method: Literal["channel"]
    sparsity: float = Field(..., ge=0.0, lt=1.0, description="Fraction of channels removed from each pruned layer "
                                                           "(for a Hugging Face transformer: of the MLP width).")
    heads: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Fraction of attention heads removed from each self-attention layer (Hugging Face "
                    "transformers; by the same importance). At least one head per layer stays.")
    importance: Literal["l1", "l2", "taylor"] = "l2"
    round_to: int | None = Field(None, ge=1, le=256, description="Keep channel counts a multiple of this.")
    dataset: Literal["train", "calibration"] = Field(
        "calibration", description="Data for `taylor` importance and for re-estimating batch-norm statistics.")
    recalibrate_bn: bool = True

    @model_validator(mode="after")
    def _removes_something(self) -> "ChannelPruneSpec":
        if self.sparsity == 0 and self.heads == 0:
            raise ValueError("set sparsity (channels) or heads (attention heads) above 0")
        return self


class ClusterSpec(StepSpec):
    """Weight sharing: k-means per layer; each weight becomes an index into a small codebook."""

    type: Literal["cluster"] = "cluster"
    clusters: int = Field(16, ge=2, le=256)
    dataset: Literal["train", "calibration"] = Field(
        "calibration", description="Data for re-estimating batch-norm statistics afterwards (model packages).")
    recalibrate_bn: bool = True


class FinetuneSpec(StepSpec):
    """Plain supervised training on the `train` dataset (labels required); keeps pruned weights at zero."""

    type: Literal["finetune"] = "finetune"
    dataset: Literal["train", "calibration"] = "train"
    epochs: int = Field(1, ge=1, le=100)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0


def _step_tag(value: Any) -> str | None:
    step_type = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if step_type == "prune":
        method = value.get("method", "magnitude") if isinstance(value, dict) else getattr(value, "method", None)
        return "prune:channel" if method == "channel" else "prune:magnitude"
    return step_type


Step = Annotated[
    Annotated[PruneSpec, Tag("prune:magnitude")] | Annotated[ChannelPruneSpec, Tag("prune:channel")]
    | Annotated[ClusterSpec, Tag("cluster")] | Annotated[FinetuneSpec, Tag("finetune")],
    Discriminator(_step_tag, custom_error_type="invalid_step",
                  custom_error_message="unknown step type; expected one of: prune, cluster, finetune"),
]
STEP_SPECS: tuple[type[StepSpec], ...] = (PruneSpec, ChannelPruneSpec, ClusterSpec, FinetuneSpec)
STEP_TAGS = {"prune:magnitude", "prune:channel", "cluster", "finetune"}
# Step types that need an eager nn.Module (model package or Hugging Face folder).
EAGER_ONLY = {ChannelPruneSpec: "channel pruning", FinetuneSpec: "fine-tuning"}
EAGER_FORMATS = ("package", "hf")
# Steps after which the input's own architecture no longer fits the weights.
CHANGES_ARCHITECTURE = (ChannelPruneSpec,)
# Formats that cannot describe a changed architecture (package: its build_model(); safetensors: the input's
# architecture). A Hugging Face folder can: its config.json is rewritten with the new widths.
FIXED_ARCHITECTURE_OUTPUTS = ("package", "safetensors")


class EvaluateSpec(Strict):
    dataset: Literal["eval", "calibration", "train"] = "eval"
    runtimes: list[Runtime] | None = Field(None, description="Default: the native runtime of each format.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [1, 32], min_length=1)
    repeats: int = Field(20, ge=1, le=1000, description="Timed runs per batch size (median and p90 reported).")
    warmup: int = Field(3, ge=0, le=100)
    max_samples: int = Field(10_000, ge=1, description="Cap on eval samples used for accuracy/agreement.")


class Recipe(Strict):
    version: Literal[1] = 1
    steps: list[Step] = Field(..., min_length=1, max_length=32)
    outputs: list[OutputFormat] | None = Field(
        None, description="Default: the input model's format. `safetensors` writes compact storage (bitmask + "
                          "values for sparse weights, codebook + packed indices for clustered ones) with a manifest.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("outputs must be a non-empty list without repeats")
        return v


PRESETS: dict[str, dict[str, Any]] = {
    "prune-50": {
        "description": "Global unstructured magnitude pruning to 50% sparsity.",
        "recipe": {"version": 1, "steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]},
    },
    "slim-50": {
        "description": "Remove 50% of channels by L2 importance (model packages); outputs .pt2 and ONNX of the "
                       "smaller architecture.",
        "recipe": {"version": 1, "steps": [{"type": "prune", "method": "channel", "sparsity": 0.5,
                                            "importance": "l2", "round_to": 8}], "outputs": ["pt2", "onnx"]},
    },
    "palette-16": {
        "description": "Weight sharing: 16 clusters per layer, stored as codebook + 4-bit indices (safetensors).",
        "recipe": {"version": 1, "steps": [{"type": "cluster", "clusters": 16}], "outputs": ["safetensors"]},
    },
}


class RecipeError(ValueError):
    """A recipe that does not validate; `errors` is a list of {field, message}."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


def field_path(loc: tuple[Any, ...]) -> str:
    """('steps', 2, 'prune', 'sparsity') -> 'steps[2].sparsity' (pydantic's union tag is dropped)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[i - 2] == "steps" and isinstance(loc[i - 1], int) and part in STEP_TAGS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_recipe(value: Any) -> Recipe:
    """A preset name or a recipe object -> Recipe, or RecipeError naming the fields."""
    if isinstance(value, str):
        if value not in PRESETS:
            raise RecipeError([{"field": "recipe", "message": f"unknown preset {value!r}; presets: {sorted(PRESETS)}"}])
        value = PRESETS[value]["recipe"]
    try:
        return Recipe.model_validate(value)
    except ValidationError as exc:
        raise RecipeError(
            [{"field": field_path(tuple(e["loc"])) or "recipe", "message": e["msg"]} for e in exc.errors()]
        ) from None


def check_against_format(recipe: Recipe, model_format: str) -> list[str]:
    """The output formats the job will write, or RecipeError for what the input format cannot do."""
    allowed = OUTPUTS_BY_INPUT[model_format]
    reshaped = [i for i, step in enumerate(recipe.steps) if isinstance(step, CHANGES_ARCHITECTURE)]
    head_pruned = [i for i, step in enumerate(recipe.steps) if isinstance(step, ChannelPruneSpec) and step.heads > 0]
    # After a structural change the input's own form no longer fits: default to graph formats.
    graph_outputs = (reshaped and model_format == "package") or (head_pruned and model_format == "hf")
    outputs = list(recipe.outputs or (["pt2", "onnx"] if graph_outputs else [model_format]))
    errors = [
        {"field": f"steps[{i}]", "message": f"{EAGER_ONLY[type(step)]} needs an eager model: upload a model package "
                                            f"(zip of model.py with build_model() + weights.safetensors) or a "
                                            f"Hugging Face folder (zip of config.json + safetensors), "
                                            f"not {model_format}"}
        for i, step in enumerate(recipe.steps) if type(step) in EAGER_ONLY and model_format not in EAGER_FORMATS
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
    if recipe.evaluate.runtimes:
        possible = {rt for fmt in [model_format, *outputs] for rt in RUNTIMES_BY_FORMAT.get(fmt, ())}
        errors += [
            {"field": f"evaluate.runtimes[{i}]", "message": f"no {rt} model in this job (formats: "
                                                            f"{sorted({model_format, *outputs})})"}
            for i, rt in enumerate(recipe.evaluate.runtimes) if rt not in possible
        ]
    if errors:
        raise RecipeError(errors)
    return outputs
