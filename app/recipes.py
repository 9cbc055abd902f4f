"""Recipe schema and presets. Pydantic only: shared by the API (validation at submit) and the worker.

A recipe is a list of steps (a discriminated union on `type`), the output formats and how to
evaluate. Adding a technique means one spec here and one registered pass in worker/engine/passes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ModelFormat = Literal["pt2", "onnx", "package"]
Runtime = Literal["torch", "onnxruntime"]

# Which output formats each input format can produce. ONNX cannot go back to a torch graph.
OUTPUTS_BY_INPUT: dict[str, tuple[str, ...]] = {
    "pt2": ("pt2", "onnx"),
    "onnx": ("onnx",),
    "package": ("package", "pt2", "onnx"),
}
# The runtime a format naturally runs on, used when evaluate.runtimes is not given.
NATIVE_RUNTIME: dict[str, str] = {"pt2": "torch", "package": "torch", "onnx": "onnxruntime"}
RUNTIMES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pt2": ("torch",),
    "package": ("torch",),
    "onnx": ("onnxruntime",),
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
    type: Literal["prune"] = "prune"
    method: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(..., gt=0.0, lt=1.0, description="Fraction of eligible weights set to zero.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one threshold over all eligible weights; layer: each layer pruned to `sparsity`."
    )
    pattern: Literal["unstructured"] = "unstructured"


Step = Annotated[PruneSpec, Field(discriminator="type")]
STEP_SPECS: tuple[type[StepSpec], ...] = (PruneSpec,)
STEP_TYPES = {spec.model_fields["type"].default for spec in STEP_SPECS}


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
    outputs: list[ModelFormat] | None = Field(None, description="Default: the input model's format.")
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
        elif i >= 2 and loc[i - 2] == "steps" and isinstance(loc[i - 1], int) and part in STEP_TYPES:
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
    outputs = list(recipe.outputs or [model_format])
    errors = [
        {"field": f"outputs[{i}]", "message": f"a {model_format} model cannot be written as {fmt}; "
                                               f"possible outputs: {list(allowed)}"}
        for i, fmt in enumerate(outputs) if fmt not in allowed
    ]
    if recipe.evaluate.runtimes:
        possible = {rt for fmt in [model_format, *outputs] for rt in RUNTIMES_BY_FORMAT[fmt]}
        errors += [
            {"field": f"evaluate.runtimes[{i}]", "message": f"no {rt} model in this job (formats: "
                                                            f"{sorted({model_format, *outputs})})"}
            for i, rt in enumerate(recipe.evaluate.runtimes) if rt not in possible
        ]
    if errors:
        raise RecipeError(errors)
    return outputs
