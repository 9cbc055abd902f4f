"""Recipes: what a job does to a model. Pydantic only, shared by the API (validation at submit) and the worker.

formats.py (formats and runtimes), steps.py (one spec per technique), recipe.py (the whole recipe: steps,
outputs, evaluate, guard), presets.py, parse.py (JSON or a preset name to a typed Recipe), checks.py (what a
recipe can do with an input format). Adding a technique means one spec in steps.py and one registered pass in
worker/engine/passes. The names below are the package's API (the worker imports them from here)."""

from app.recipes.checks import (
                                 QUANTIZE_OUTPUTS,
                                 check_against_format,
                                 compact_default_outputs,
                                 quantize_default_outputs,
                                 teacher_model_ids,
)
from app.recipes.formats import (
                                 NATIVE_RUNTIME,
                                 OUTPUTS_BY_INPUT,
                                 RUNTIMES_BY_FORMAT,
                                 ModelFormat,
                                 OutputFormat,
                                 Runtime,
)
from app.recipes.parse import RecipeError, field_path, parse_recipe
from app.recipes.presets import PRESETS
from app.recipes.recipe import (
                                 EvaluateSpec,
                                 GuardSpec,
                                 Objective,
                                 Recipe,
                                 TextSpec,
                                 WeightedObjective,
)
from app.recipes.steps import (
                                 STEP_SPECS,
                                 TRAINING_STEPS,
                                 ChannelPruneSpec,
                                 ClusterSpec,
                                 DistillSpec,
                                 FinetuneSpec,
                                 PruneSpec,
                                 QuantizeSpec,
                                 Step,
                                 StepSpec,
                                 TrainingSpec,
)

__all__ = [
    "NATIVE_RUNTIME", "OUTPUTS_BY_INPUT", "PRESETS", "QUANTIZE_OUTPUTS", "RUNTIMES_BY_FORMAT", "STEP_SPECS",
    "TRAINING_STEPS", "ChannelPruneSpec", "ClusterSpec", "DistillSpec", "EvaluateSpec", "FinetuneSpec", "GuardSpec",
    "ModelFormat", "Objective", "OutputFormat", "PruneSpec", "QuantizeSpec", "Recipe", "RecipeError", "Runtime", "Step",
    "StepSpec", "TextSpec", "TrainingSpec", "WeightedObjective", "check_against_format", "compact_default_outputs", "field_path",
    "parse_recipe", "quantize_default_outputs", "teacher_model_ids",
]
