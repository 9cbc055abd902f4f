"""The recipe's steps (a discriminated union on `type`): one spec per technique, each matched by one registered
pass in worker/engine/passes, and what each step needs of the input format."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

# Caps on every list a recipe holds, so that one job cannot take a worker for hours: timing is batch sizes x
# repeats x runtimes x models, and each name pattern is matched against every parameter.
MAX_BATCH_SIZES = 8
MAX_BATCH_SIZE = 1024
MAX_REPEATS = 200
MAX_PATTERNS = 256
Pattern = Annotated[str, Field(max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def matches(pattern: str, name: str) -> bool:
    """A name pattern: `re:<regex>` (llm-compressor's syntax: re.match on the parameter name, or on its module's
    name without `.weight`), else fnmatch on the parameter name."""
    if pattern.startswith("re:"):
        module = name.removesuffix(".weight")
        return any(re.match(pattern[3:], n) is not None for n in (name, module))
    return fnmatchcase(name, pattern)


class StepSpec(Strict):
    """Fields every step has: which modules/parameters it applies to (fnmatch patterns, or `re:` regexes, on
    parameter names). A pattern that matches no eligible parameter fails the job, naming it (never ignored)."""

    targets: list[Pattern] | None = Field(
        None, max_length=MAX_PATTERNS,
        description="Only parameters whose name matches one of these patterns (default: all eligible). fnmatch "
                    "(`*.q_proj.weight`) or `re:<regex>` (llm-compressor's syntax, matched at the start of the "
                    "parameter or module name)."
    )
    ignore: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                  description="Parameters whose name matches are left alone (same syntax).")

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes_compile(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or []:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return v

    def selects(self, name: str) -> bool:
        """Whether `name` matches a target (every name when targets is None) and no ignore pattern."""
        return (self.targets is None or any(matches(p, name) for p in self.targets)) \
            and not any(matches(p, name) for p in self.ignore)


class PruneSpec(StepSpec):
    """Pruning that zeroes weights (unstructured, or N:M along the input dimension): `magnitude` zeroes the
    smallest; `sparsegpt` and `wanda` (Hugging Face causal LMs, llm-compressor) choose by calibration data, layer
    by layer, and SparseGPT also updates the weights that stay to make up for the ones removed."""

    type: Literal["prune"] = "prune"
    method: Literal["magnitude", "sparsegpt", "wanda"] = "magnitude"
    dataset: Literal["calibration", "train", "eval"] = Field(
        "calibration", description="Calibration text for sparsegpt and wanda (another of the job's datasets if "
                                   "absent, with a note).")
    samples: int = Field(64, ge=1, le=100_000, description="Calibration windows (sparsegpt, wanda).")
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
    def _sparsity_matches_pattern(self) -> PruneSpec:
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
    def _removes_something(self) -> ChannelPruneSpec:
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


QuantMethod = Literal["static_int8", "dynamic_int8", "weight_int8", "weight_int4", "binary", "w8a8", "fp8"]
KeepFloat = Literal["first", "last", "norm"]
# Layers kept in float unless `keep_float` says otherwise: the first layer (raw inputs, few input channels: slow
# and lossy in int8) and the last (the logits) for static int8; the logits for the other int8/int4 methods.
# For static int8 written as ONNX the first layer's default is checked by measurement (quantize/ort.py).
# `binary` keeps nothing by default: its point is storage, and a float first layer would dominate a small model.
DEFAULT_KEEP_FLOAT: dict[str, tuple[str, ...]] = {
    "static_int8": ("first", "last", "norm"), "dynamic_int8": ("last", "norm"), "weight_int8": ("last", "norm"),
    "weight_int4": ("last", "norm"), "binary": ("norm",), "w8a8": ("last", "norm"), "fp8": ("last", "norm"),
}
# Methods for Hugging Face causal LMs only, through llm-compressor (worker/engine/llm/llmc.py).
LLM_METHODS = ("w8a8", "fp8")


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
    samples: int | None = Field(
        None, ge=1, le=100_000, description="Calibration samples used: static_int8 (default 256) and the "
                                            "calibrating LLM algorithms (gptq, awq, w8a8: default 64 windows of "
                                            "`text.seq_len` tokens).")
    algorithm: Literal["rtn", "gptq", "awq"] | None = Field(
        None, description="weight_int4/weight_int8 on a Hugging Face causal LM (llm-compressor): rtn rounds each "
                          "weight to the nearest level (no data); gptq corrects the rounding error layer by layer "
                          "from calibration data; awq scales salient channels first. Default: rtn. Other models: "
                          "rtn only (torchao).")
    symmetric: bool = Field(True, description="LLM weight quantization: symmetric levels (else zero-point).")
    act_order: bool = Field(False, description="gptq: quantize columns in order of activation size.")
    smoothing_strength: float = Field(0.8, gt=0.0, lt=1.0, description="w8a8: SmoothQuant's migration strength.")
    sensitivity: bool = Field(False, description="Causal LMs: measure each decoder layer's perplexity change when it "
                                                 "alone is rounded to the step's bits, on calibration windows; the "
                                                 "report lists them, most sensitive first.")
    bits_budget: float | None = Field(
        None, gt=4.0, lt=8.0, description="weight_int4 on a causal LM: mixed precision. The most sensitive decoder "
                                          "layers (measured as `sensitivity` does) stay at 8 bits while the average "
                                          "bits per quantized weight stays within this budget.")
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
    def _group_size_fits(self) -> QuantizeSpec:
        if self.algorithm not in (None, "rtn") and self.method not in ("weight_int4", "weight_int8"):
            raise ValueError(f"algorithm {self.algorithm} applies to weight_int4 and weight_int8 (w8a8 runs "
                             "SmoothQuant + GPTQ itself)")
        if self.bits_budget is not None and self.method != "weight_int4":
            raise ValueError("bits_budget mixes 4- and 8-bit layers: it applies to weight_int4")
        if self.group_size is not None:
            if self.method not in ("weight_int4", "weight_int8"):
                raise ValueError("group_size applies to weight_int4 and weight_int8 only")
            if self.group_size not in (16, 32, 64, 128, 256):
                raise ValueError("group_size must be one of 16, 32, 64, 128, 256")
        return self

    @property
    def calibration_samples(self) -> int:
        return self.samples or (256 if self.method == "static_int8" else 64)

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
