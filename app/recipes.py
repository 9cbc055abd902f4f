"""Recipe schema and presets. Pydantic only: shared by the API (validation at submit) and the worker.

A recipe is a list of steps (a discriminated union on `type`), the output formats and how to
evaluate. Adding a technique means one spec here and one registered pass in worker/engine/passes.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal, get_args

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

ModelFormat = Literal["pt2", "onnx", "package", "hf"]
OutputFormat = Literal["pt2", "onnx", "package", "hf", "safetensors"]
Runtime = Literal["torch", "torch-compile", "onnxruntime"]
# Caps on every list a recipe holds, so that one job cannot take a worker for hours: timing is batch sizes x
# repeats x runtimes x models, and each name pattern is matched against every parameter.
MAX_BATCH_SIZES = 8
MAX_BATCH_SIZE = 1024
MAX_REPEATS = 200
MAX_PATTERNS = 256
Pattern = Annotated[str, Field(max_length=200)]

# Which output formats each input format can produce. ONNX cannot go back to a torch graph.
OUTPUTS_BY_INPUT: dict[str, tuple[str, ...]] = {
    "pt2": ("pt2", "onnx", "safetensors"),
    "onnx": ("onnx", "safetensors"),
    "package": ("package", "pt2", "onnx", "safetensors"),
    "hf": ("hf", "pt2", "onnx", "safetensors"),
}
# The runtime a format naturally runs on, used when evaluate.runtimes is not given.
NATIVE_RUNTIME: dict[str, str] = {"pt2": "torch", "package": "torch", "hf": "torch", "onnx": "onnxruntime"}
# torch-compile: inductor with static shapes (dynamic=False; a dynamic batch hit an inductor assertion in int8
# conv, bench/RESULTS.md), compiled once per batch size before timing.
RUNTIMES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pt2": ("torch", "torch-compile"),
    "package": ("torch", "torch-compile"),
    "hf": ("torch", "torch-compile"),
    "onnx": ("onnxruntime",),
    "safetensors": (),  # a storage format: loaded back into a dense model to run
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepSpec(Strict):
    """Fields every step has: which modules/parameters it applies to (fnmatch patterns on names)."""

    targets: list[Pattern] | None = Field(
        None, max_length=MAX_PATTERNS,
        description="Only parameters whose name matches one of these patterns (default: all eligible)."
    )
    ignore: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                  description="Parameters whose name matches are left alone.")

    def selects(self, name: str) -> bool:
        """Whether `name` matches a target (every name when targets is None) and no ignore pattern."""
        return (self.targets is None or any(fnmatchcase(name, p) for p in self.targets)) \
            and not any(fnmatchcase(name, p) for p in self.ignore)


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


class TrainingSpec(StepSpec):
    """Options every training step has (`finetune`, `distill`). `targets`/`ignore` pick the trained parameters."""

    dataset: Literal["train", "calibration"] = "train"
    epochs: int = Field(1, ge=1, le=100)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="Learning-rate schedule over the epochs (step: x`gamma` every `step_size` epochs).")
    step_size: int = Field(1, ge=1, le=100)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0, le=1e6, description="Clip the gradient norm to this.")
    keep: Literal["best", "last"] = Field(
        "last", description="Which epoch's weights become the result: best = highest accuracy on the eval dataset.")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class FinetuneSpec(TrainingSpec):
    """Plain supervised training on the `train` dataset (labels required); keeps pruned weights at zero."""

    type: Literal["finetune"] = "finetune"


class DistillSpec(TrainingSpec):
    """Knowledge distillation: the model (student) learns the teacher's softened outputs, mixed with the labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)
    (+ feature_weight * MSE of the named intermediate outputs). alpha 1 needs no labels.
    """

    type: Literal["distill"] = "distill"
    teacher: str = Field("original", min_length=1, max_length=64,
                         description="`original` (the model as uploaded) or the id of another model of the team.")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the soft (teacher) loss; 1 = label-free.")
    hard_labels: bool = Field(False, description="Use the teacher's argmax as the labels (no labels needed).")
    features: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=64,
        description="Module names present in both teacher and student whose outputs are matched (MSE), for "
                    "students that keep the teacher's layout.")
    feature_weight: float = Field(1.0, ge=0.0, le=1000.0)

    @field_validator("teacher")
    @classmethod
    def _teacher_id(cls, v: str) -> str:
        if v != "original" and not all(c.isalnum() or c in "_-" for c in v):
            raise ValueError("teacher must be 'original' or a model id")
        return v

    @property
    def needs_labels(self) -> bool:
        return self.alpha < 1 and not self.hard_labels


QuantMethod = Literal["static_int8", "dynamic_int8", "weight_int8", "weight_int4", "binary"]
KeepFloat = Literal["first", "last", "norm"]
# Layers kept in float unless `keep_float` says otherwise: the first layer (raw inputs, few input channels: slow
# and lossy in int8) and the last (the logits) for static int8; the logits for the other int8/int4 methods.
# For static int8 written as ONNX the first layer's default is checked by measurement (quantize/ort.py).
# `binary` keeps nothing by default: its point is storage, and a float first layer would dominate a small model.
DEFAULT_KEEP_FLOAT: dict[str, tuple[str, ...]] = {
    "static_int8": ("first", "last", "norm"), "dynamic_int8": ("last", "norm"), "weight_int8": ("last", "norm"),
    "weight_int4": ("last", "norm"), "binary": ("norm",),
}


class QuantizeSpec(StepSpec):
    """Quantization. `static_int8`: int8 weights and activations calibrated on a dataset (ONNX Runtime QDQ for
    ONNX output, PT2E with the X86 inductor quantizer for .pt2 output). `dynamic_int8`: int8 weights, activations
    quantized per batch at run time (ONNX Runtime dynamic for ONNX, eager dynamic quantization for model packages).
    `weight_int8`/`weight_int4`: torchao weight-only (eager models; int4 in groups of `group_size`). `binary`: 1-bit
    sign weights with a per-output-channel scale, a storage format (compact safetensors output); the model runs
    with the weights decoded to float."""

    type: Literal["quantize"] = "quantize"
    method: QuantMethod = "static_int8"
    dataset: Literal["calibration", "train", "eval"] = Field(
        "calibration", description="Calibration data for static_int8 (another of the job's datasets if absent).")
    samples: int = Field(256, ge=1, le=100_000, description="Calibration samples used (static_int8).")
    calibration: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="How activation ranges are chosen from the calibration data (static_int8).")
    per_channel: bool = Field(True, description="One weight scale per output channel (else one per tensor).")
    group_size: int | None = Field(
        None, description="weight_int4 (default 128) and weight_int8 (default: per channel): weights share a "
                          "scale in groups of this many along the input dimension.")
    keep_float: list[KeepFloat] | None = Field(
        None, max_length=len(get_args(KeepFloat)),
        description="Layer kinds left in float: first (takes the model input), last (produces the output), "
                    "norm (normalization ops). Default: first+last+norm for static_int8 (with ONNX output "
                    "the first layer is also timed in int8 and quantized where that is faster; the step's "
                    "notes say which), last+norm for the other int8/int4 methods, norm for binary. Given "
                    "explicitly, it is followed as is. `targets`/`ignore` select among the rest.")

    @model_validator(mode="after")
    def _group_size_fits(self) -> "QuantizeSpec":
        if self.group_size is not None:
            if self.method not in ("weight_int4", "weight_int8"):
                raise ValueError("group_size applies to weight_int4 and weight_int8 only")
            if self.group_size not in (16, 32, 64, 128, 256):
                raise ValueError("group_size must be one of 16, 32, 64, 128, 256")
        return self

    @property
    def kept_kinds(self) -> tuple[str, ...]:
        return tuple(self.keep_float) if self.keep_float is not None else DEFAULT_KEEP_FLOAT[self.method]


def _step_tag(value: Any) -> str | None:
    step_type = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if step_type == "prune":
        method = value.get("method", "magnitude") if isinstance(value, dict) else getattr(value, "method", None)
        return "prune:channel" if method == "channel" else "prune:magnitude"
    return step_type


Step = Annotated[
    Annotated[PruneSpec, Tag("prune:magnitude")] | Annotated[ChannelPruneSpec, Tag("prune:channel")]
    | Annotated[ClusterSpec, Tag("cluster")] | Annotated[FinetuneSpec, Tag("finetune")]
    | Annotated[DistillSpec, Tag("distill")] | Annotated[QuantizeSpec, Tag("quantize")],
    Discriminator(_step_tag, custom_error_type="invalid_step",
                  custom_error_message="unknown step type; expected one of: prune, cluster, finetune, distill, "
                                       "quantize"),
]
STEP_SPECS: tuple[type[StepSpec], ...] = (PruneSpec, ChannelPruneSpec, ClusterSpec, FinetuneSpec, DistillSpec,
                                            QuantizeSpec)
STEP_TAGS = {"prune:magnitude", "prune:channel", "cluster", "finetune", "distill", "quantize"}
# Step types that need an eager nn.Module (model package or Hugging Face folder).
EAGER_ONLY = {ChannelPruneSpec: "channel pruning"}
# Steps that train, and the formats that can (a .pt2 trains through its program's module(); ONNX cannot here).
TRAINABLE = {FinetuneSpec: "fine-tuning", DistillSpec: "distillation"}
TRAINABLE_FORMATS = ("package", "hf", "pt2")
TRAINING_STEPS = tuple(TRAINABLE)  # routed to the GPU queue when one is configured
EAGER_FORMATS = ("package", "hf")
# Steps after which the input's own architecture no longer fits the weights.
CHANGES_ARCHITECTURE = (ChannelPruneSpec,)
# Formats that cannot describe a changed architecture (package: its build_model(); safetensors: the input's
# architecture). A Hugging Face folder can: its config.json is rewritten with the new widths.
FIXED_ARCHITECTURE_OUTPUTS = ("package", "safetensors")


class EvaluateSpec(Strict):
    dataset: Literal["eval", "calibration", "train"] = "eval"
    runtimes: list[Runtime] | None = Field(None, max_length=len(get_args(Runtime)),
                                           description="Default: the native runtime of each format.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]] = Field(
        default_factory=lambda: [1, 32], min_length=1, max_length=MAX_BATCH_SIZES,
        description=f"Batch sizes timed (at most {MAX_BATCH_SIZES}, each at most {MAX_BATCH_SIZE}).")
    repeats: int = Field(20, ge=1, le=MAX_REPEATS, description="Timed runs per batch size (median and p90 reported).")
    warmup: int = Field(3, ge=0, le=100)
    max_samples: int = Field(10_000, ge=1, le=1_000_000, description="Cap on eval samples used for accuracy/agreement.")
    threads: int | None = Field(None, ge=1, le=1024, description=(
        "Intra-op threads each runtime gets while the original and the result are measured, as the model will be "
        "served (one per replica is common). Default: all the sandbox has (SQUEEZE_SANDBOX_THREADS); more than "
        "that is capped, with a note. The steps (training, calibration) always use all of them."))


class GuardSpec(Strict):
    """Bounds the result must meet; a job that misses one ends `failed` with `guard_failed`, artifacts kept."""

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0, description="Accuracy lost, as a fraction "
                                                                           "(0.01 = one point).")
    min_agreement: float | None = Field(None, ge=0.0, le=1.0, description="Top-1 agreement with the original.")
    min_speedup: float | None = Field(None, gt=0.0, le=10_000.0)
    min_size_ratio: float | None = Field(None, gt=0.0, le=1_000_000.0, description="Original size / result size "
                                                                                   "(the smallest artifact).")
    runtime: Runtime | None = Field(None, description="Runtime min_speedup is read on (default: the first timed "
                                                      "on both original and result).")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="Batch min_speedup is read at "
                                                                              "(default: the largest timed).")

    @model_validator(mode="after")
    def _has_a_bound(self) -> "GuardSpec":
        if all(v is None for v in (self.max_accuracy_drop, self.min_agreement, self.min_speedup,
                                   self.min_size_ratio)):
            raise ValueError("a guard needs at least one bound")
        return self


class WeightedObjective(Strict):
    """Score = size * ln(size ratio) + speed * ln(speed-up) - accuracy * (accuracy drop in points)."""

    size: float = Field(0.0, ge=0.0, le=1000.0)
    speed: float = Field(0.0, ge=0.0, le=1000.0)
    accuracy: float = Field(0.0, ge=0.0, le=1000.0)


Objective = Literal["smallest", "fastest"] | WeightedObjective


class Recipe(Strict):
    version: Literal[1] = 1
    steps: list[Step] = Field(..., min_length=1, max_length=32)
    outputs: list[OutputFormat] | None = Field(
        None, max_length=len(get_args(OutputFormat)),
        description="Default: the input model's format. `safetensors` writes compact storage (bitmask + "
                    "values for sparse weights, codebook + packed indices for clustered ones) with a manifest.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    guard: GuardSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where training steps run: auto = CUDA when the worker has it (and its settings allow), "
                            "cuda = fail at once on a worker without CUDA.")

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
    "int8": {
        "description": "Static int8 (weights and activations, calibrated on the calibration dataset), written as "
                       "ONNX for ONNX Runtime: the fast CPU path.",
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "static_int8"}], "outputs": ["onnx"],
                   "evaluate": {"runtimes": ["onnxruntime"]}},
    },
    "int8-dynamic": {
        "description": "Dynamic int8 (int8 weights, activations quantized per batch; no calibration data), written "
                       "as ONNX: for Linear/LSTM-heavy models such as transformers.",
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "dynamic_int8"}], "outputs": ["onnx"],
                   "evaluate": {"runtimes": ["onnxruntime"]}},
    },
    "int4-weights": {
        "description": "torchao int4 weight-only quantization in groups of 128 (model packages): a memory and "
                       "storage saving, not a CPU speed-up.",
        "recipe": {"version": 1, "steps": [{"type": "quantize", "method": "weight_int4", "group_size": 128}],
                   "outputs": ["package"]},
    },
    "slim-50-distill": {
        "description": "Remove 50% of channels (model packages, Hugging Face folders), win the accuracy back by "
                       "distilling from the original for 3 epochs (needs a labelled train dataset), then static "
                       "int8 as ONNX for ONNX Runtime.",
        "recipe": {"version": 1, "steps": [
            {"type": "prune", "method": "channel", "sparsity": 0.5, "importance": "l2", "round_to": 8},
            {"type": "distill", "teacher": "original", "dataset": "train", "epochs": 3, "lr": 3e-3,
             "schedule": "cosine", "temperature": 4, "alpha": 0.7},
            {"type": "quantize", "method": "static_int8"}], "outputs": ["onnx"],
            "evaluate": {"runtimes": ["onnxruntime"]}},
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


# What a quantized model can be written as, by method and input format, and why not otherwise.
QUANTIZE_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "static_int8": {"pt2": ("onnx", "pt2"), "package": ("onnx", "pt2"), "hf": ("onnx", "pt2"), "onnx": ("onnx",)},
    "dynamic_int8": {"pt2": ("onnx",), "package": ("onnx", "package"), "hf": ("onnx",), "onnx": ("onnx",)},
    "weight_int8": {"package": ("package",)},
    "weight_int4": {"package": ("package",)},
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
}


def quantize_default_outputs(recipe: Recipe, model_format: str) -> list[str] | None:
    """The outputs a quantize step implies when the recipe names none (its method's natural form), else None."""
    step = next((s for s in recipe.steps if isinstance(s, QuantizeSpec)), None)
    if step is None or recipe.outputs:
        return None
    if step.method == "binary":
        return ["safetensors"]  # the packed sign bits: any other form stores the decoded float weights
    possible = QUANTIZE_OUTPUTS[step.method].get(model_format, ())
    return [model_format] if model_format in possible else ["onnx"]


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
            if model_format == "hf":
                message = (f"{step.method} (torchao) is stored in model packages only so far; for a Hugging Face "
                           "model use dynamic_int8 (ONNX output) or upload it as a model package")
            else:
                message = (f"{step.method} (torchao) needs an eager model: upload a model package (zip of model.py "
                           f"with build_model() + weights.safetensors), not {model_format}; for ONNX or .pt2 models "
                           "use static_int8 or dynamic_int8")
            errors.append({"field": field, "message": message})
            continue
        for j, fmt in enumerate(outputs):
            if fmt not in possible and fmt in OUTPUTS_BY_INPUT[model_format]:
                errors.append({"field": f"outputs[{j}]", "message": f"steps[{i}]: {_QUANTIZE_WHY[step.method]}; "
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
    """The uploaded models a (validated) recipe's distill steps learn from ("original" is the job's own model)."""
    return [step["teacher"] for step in recipe.get("steps", [])
            if step.get("type") == "distill" and step.get("teacher") not in (None, "original")]
