"""The one schema of report.json, every job's measured report (built as `Report` by worker/engine/job/report.py).

Required fields are what a reader may rely on for any job, whatever its steps and formats; step reports differ by
step type and are checked for their common fields only. `validate_report(data)` raises pydantic's
ValidationError naming the field that does not fit; `Report.model_json_schema()` is the JSON Schema. Numbers are
`int | float`, so a report dumps each number as it was measured (8 bits stays 8, not 8.0).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

REPORT_SCHEMA_VERSION = 1
Number = int | float
Ratio = Number | None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Timing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    median: Number = Field(..., ge=0)
    p90: Number = Field(..., ge=0)


class Side(_Open):
    """One model (original or result) as measured: on disk, in parameters, in compute, in time, in quality."""

    format: str
    size_bytes: int = Field(..., ge=0)
    params: int = Field(..., ge=0)
    nonzero_params: int = Field(..., ge=0)
    sparsity: Number = Field(..., ge=0, le=1)
    latency_ms: dict[str, dict[str, Timing]]  # runtime -> batch size -> median/p90
    accuracy: Number | None = Field(..., ge=0, le=1)
    macs: int | None


class Result(Side):
    agreement: Number | None = Field(..., ge=0, le=1)
    cosine: Number | None
    max_abs_error: Number | None


class Ratios(_Open):
    size: Ratio
    params: Ratio
    nonzero_params: Ratio
    latency: dict[str, dict[str, Ratio]]
    accuracy_drop: Number | None


class Layer(_Open):
    name: str
    shape: list[int]
    shape_after: list[int] | None
    sparsity_before: Number | None
    sparsity_after: Number | None
    bits: Number | None


class GuardCheck(_Open):
    bound: Literal["max_accuracy_drop", "min_agreement", "min_speedup", "min_size_ratio", "max_perplexity_increase"]
    limit: Number
    measured: Number | None
    passed: bool
    missed_by: Number | None


class GuardVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    passed: bool
    checks: list[GuardCheck]


class Environment(_Open):
    python: str
    platform: str
    cpu: str
    cores: int | None
    gpu: str | None
    threads: int = Field(..., ge=1)
    libraries: dict[str, str | None]


class Run(_Open):
    recipe_hash: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    model_sha256: str | None
    device: Literal["cpu", "cuda"]
    environment: Environment
    timings: dict[str, Number]
    step_seconds: list[Number | None]


class Recommended(BaseModel):
    """One model on one runtime, as the deploy recommendation names it."""

    model_config = ConfigDict(extra="forbid")
    runtime: str = Field(..., min_length=1)
    format: str = Field(..., min_length=1)  # the format that ran ("onnx" for the original's fp32 ONNX export)
    model: Literal["result", "original"]
    latency_ms: Number = Field(..., ge=0)  # the median at this batch size


class Recommendation(Recommended):
    runner_up: Recommended | None  # the fastest on another runtime or format; None when nothing else ran


RECOMMENDATION = TypeAdapter(dict[Annotated[str, Field(pattern=r"^[1-9][0-9]*$")], Recommendation])


class Metrics(_Open):
    """Also, in reports written since issue 17 (absent before, so not declared: an older report dumps unchanged):
    `flag_reasons` ({flag: one-line reason}, worker/engine/job/flags.py) and `size_ratio_output` (the output the
    headline `ratios.size` is of: the smallest the job wrote); since issue 19, `recommendation` (batch size ->
    `Recommendation`: the fastest runtime and format measured, worker/engine/job/report.py); checked by
    `_newer_fields`."""

    original: Side
    compressed: Result
    ratios: Ratios
    layers: list[Layer]
    flags: list[Literal["no_size_reduction", "no_speedup", "calibrated_on_eval"]]
    run: Run

    @model_validator(mode="after")
    def _newer_fields(self) -> "Metrics":
        extra = self.model_extra or {}
        if "flag_reasons" in extra:
            reasons = extra["flag_reasons"]
            if not isinstance(reasons, dict) or set(reasons) != set(self.flags) \
                    or not all(isinstance(v, str) and v for v in reasons.values()):
                raise ValueError("flag_reasons must give each flag (and only those) a one-line reason")
        if not isinstance(extra.get("size_ratio_output", ""), str):
            raise ValueError("size_ratio_output must name an output format")
        if "recommendation" in extra:
            try:
                RECOMMENDATION.validate_python(extra["recommendation"])
            except ValidationError as exc:
                raise ValueError(f"recommendation: {exc}") from None
        return self


class StepReport(_Open):
    index: int = Field(..., ge=0)
    stage: str
    type: str
    seconds: Number = Field(..., ge=0)


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    path: str
    sha256: str | None


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    job_id: str | None
    device: Literal["cpu", "cuda"]
    model: ModelRef
    recipe: dict[str, Any]
    recipe_hash: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    guard: GuardVerdict | None
    outputs: list[str] = Field(..., min_length=1)
    metrics: Metrics
    steps: list[StepReport] = Field(..., min_length=1)
    layers: list[Layer]
    timings: dict[str, Number]
    engine_seconds: Number = Field(..., ge=0)
    notes: list[str]
    environment: Environment


def validate_report(data: dict[str, Any]) -> Report:
    return Report.model_validate(data)
