"""A recipe: its steps, the output formats, how to evaluate and the guard the result must meet."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator

from app.recipes.formats import OutputFormat, Runtime
from app.recipes.steps import MAX_BATCH_SIZE, MAX_BATCH_SIZES, MAX_REPEATS, Step, Strict


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


class TextSpec(Strict):
    """How text datasets (.txt, .jsonl, .parquet) become token windows, by the model's own tokenizer, in the job."""

    seq_len: int = Field(512, ge=8, le=32_768, description="Tokens per window (calibration and perplexity); "
                                                           "at most the model's context.")
    packing: bool = Field(True, description="Join the documents (separated by the end-of-text token) and cut "
                                            "windows from the stream; false: one window per document, truncated, "
                                            "shorter ones dropped.")
    eval_tokens: int = Field(4096, ge=8, le=1_000_000, description="Eval tokens perplexity is measured on "
                                                                   "(from the start of the eval text).")
    stride: int | None = Field(None, ge=1, le=32_768, description="Perplexity windows start this many tokens "
                                                                  "apart (default seq_len: no overlap; less "
                                                                  "scores each token with more context).")
    generate_tokens: int = Field(32, ge=1, le=1024, description="Tokens generated (greedy, batch 1) to time "
                                                                "decoding.")


class GuardSpec(Strict):
    """Bounds the result must meet; a job that misses one ends `failed` with `guard_failed`, artifacts kept."""

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0, description="Accuracy lost, as a fraction "
                                                                           "(0.01 = one point).")
    min_agreement: float | None = Field(None, ge=0.0, le=1.0, description="Top-1 agreement with the original.")
    min_speedup: float | None = Field(None, gt=0.0, le=10_000.0)
    min_size_ratio: float | None = Field(None, gt=0.0, le=1_000_000.0, description="Original size / result size "
                                                                                   "(the smallest artifact).")
    max_perplexity_increase: float | None = Field(
        None, ge=0.0, le=1000.0, description="Causal LMs: relative perplexity increase on the eval text (0.05 = "
                                             "+5%), the worst output's.")
    runtime: Runtime | None = Field(None, description="Runtime min_speedup is read on (default: the first timed "
                                                      "on both original and result).")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="Batch min_speedup is read at "
                                                                              "(default: the largest timed).")

    @model_validator(mode="after")
    def _has_a_bound(self) -> "GuardSpec":
        if all(v is None for v in (self.max_accuracy_drop, self.min_agreement, self.min_speedup,
                                   self.min_size_ratio, self.max_perplexity_increase)):
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
    text: TextSpec = Field(default_factory=TextSpec, description="Text datasets: windows and perplexity.")
    gguf_type: Literal["q8_0", "q4_0", "q4_1", "q5_0", "f16"] | None = Field(
        None, description="GGUF output's weight type; default from the steps: q4_0 after 4-bit quantization, else "
                          "q8_0.")
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
