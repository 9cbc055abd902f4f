"""The llm-compressor adapter: GPTQ, AWQ, RTN, SmoothQuant W8A8, FP8, SparseGPT and Wanda on an in-memory causal LM.

One `LlmcStep` becomes an llm-compressor recipe (its real modifiers), run by `oneshot` on the model in place with
calibration token ids given as an in-memory dataset; compressed.py writes the compressed-tensors folder that vLLM
loads (`save_compressed`) and reads it back (`load_compressed`). Everything llm-compressor writes goes under the caller's folders:
oneshot re-reads the model's config.json from `model.config._name_or_path`, so that points into `workdir` while it
runs, and nothing is saved by oneshot itself (no output_dir, no log_dir: loguru logs go to stderr only).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from worker.engine.errors import EngineError, blame
from worker.engine.llm.observe import PeakRss, layer_progress

Kind = Literal["rtn", "gptq", "awq", "w8a8", "fp8", "sparsegpt", "wanda"]
KINDS: tuple[str, ...] = ("rtn", "gptq", "awq", "w8a8", "fp8", "sparsegpt", "wanda")
CALIBRATING = frozenset({"gptq", "awq", "w8a8", "sparsegpt", "wanda"})  # need token ids
WEIGHT_GROUPED = frozenset({"rtn", "gptq", "awq"})  # honour bits / group_size / symmetric
SPARSE = frozenset({"sparsegpt", "wanda"})
_GLOB_CHARS = set("*?[")


@dataclass
class LlmcStep:
    """One llm-compressor step, as the recipe gives it."""

    kind: Kind
    bits: int = 4                    # weight bits for rtn/gptq/awq: 4 or 8
    group_size: int | None = 128     # None: one scale per output channel
    symmetric: bool = True
    act_order: bool = False          # gptq only
    smoothing_strength: float = 0.8  # w8a8 (SmoothQuant) only
    sparsity: float = 0.5            # sparsegpt / wanda
    mask_structure: str = "0:0"      # "0:0" unstructured, "2:4" semi-structured
    targets: list[str] = field(default_factory=lambda: ["Linear"])  # llm-compressor syntax: class names, "re:..."
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])


# ---------------------------------------------------------------------------------------------------------------
# module matching


def _pattern_matches(name: str, module: torch.nn.Module, pattern: str) -> bool:
    """llm-compressor's rule (`re:` regex with re.match, exact name, class name in the MRO) plus fnmatch on names."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern == name or any(cls.__name__ == pattern for cls in type(module).__mro__):
        return True
    return bool(_GLOB_CHARS & set(pattern)) and fnmatch.fnmatchcase(name, pattern)


def _linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module


def match_modules(model: torch.nn.Module, patterns: list[str]) -> dict[str, list[str]]:
    """For each pattern, the Linear module names it matches: `re:<regex>` (llm-compressor's syntax, re.match
    on the module name), a class name ("Linear"), or an fnmatch pattern on the module name. Used by the lead to
    refuse a pattern that matches nothing (never silently ignored)."""
    linears = list(_linears(model))
    return {p: [name for name, module in linears if _pattern_matches(name, module, p)] for p in patterns}


def selected_linears(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """The Linear module names that `targets` match and `ignore` does not, in model order."""
    return [name for name, module in _linears(model)
            if any(_pattern_matches(name, module, t) for t in targets)
            and not any(_pattern_matches(name, module, i) for i in ignore)]


def _llmc_pattern(pattern: str) -> str:
    """A pattern in llm-compressor's own syntax: fnmatch globs become `re:` regexes, the rest pass unchanged."""
    if pattern.startswith("re:") or not (_GLOB_CHARS & set(pattern)):
        return pattern
    return "re:" + fnmatch.translate(pattern)


def _llmc_targets(model: torch.nn.Module, step: LlmcStep, selected: list[str]) -> tuple[list[str], list[str]]:
    """Targets and ignore to hand llm-compressor. The user's patterns (readable in config.json) when llm-compressor's
    own matcher picks exactly `selected` and no other module type with them; else the exact module names (always
    for the pruning modifiers, whose ignore misses exact names of Linear targets in 0.14)."""
    from compressed_tensors.utils import match_named_modules

    if step.kind in SPARSE:  # their ignore check sees "name." for a Linear target, so "lm_head" would not hold
        return list(selected), []
    targets = [_llmc_pattern(p) for p in step.targets]
    ignore = [_llmc_pattern(p) for p in step.ignore]
    picked = list(match_named_modules(model, targets, ignore))
    if [n for n, _ in picked] == selected and all(isinstance(m, torch.nn.Linear) for _, m in picked):
        return targets, ignore
    return list(selected), []


# ---------------------------------------------------------------------------------------------------------------
# validation


def _validate(model: torch.nn.Module, step: LlmcStep, calibration: torch.Tensor | None) -> list[str]:
    """Check the step against the model and data before anything runs; returns the selected Linear names."""
    if step.kind not in KINDS:
        raise EngineError("unsupported", f"unknown llm-compressor step kind {step.kind!r}; use one of {list(KINDS)}")
    if step.kind in WEIGHT_GROUPED and step.bits not in (4, 8):
        raise EngineError("unsupported", f"{step.kind}: bits={step.bits} is not supported; use 4 or 8")
    if step.kind in SPARSE:
        _validate_sparsity(step)
    if step.kind in CALIBRATING:
        _validate_calibration(model, step, calibration)
    selected = selected_linears(model, step.targets, step.ignore)
    if not selected:
        raise EngineError("no_effect", f"{step.kind}: no Linear module matches targets {step.targets} minus ignore "
                                       f"{step.ignore}; check the module names (e.g. 're:.*q_proj$', 'Linear')")
    if step.kind in WEIGHT_GROUPED and step.group_size is not None:
        _validate_group_size(model, step.group_size, selected)
    return selected


def _validate_sparsity(step: LlmcStep) -> None:
    if not 0.0 < step.sparsity < 1.0:
        raise EngineError("unsupported", f"{step.kind}: sparsity must be between 0 and 1, got {step.sparsity}")
    parts = step.mask_structure.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
        raise EngineError("unsupported", f"{step.kind}: mask_structure {step.mask_structure!r} is not 'N:M' "
                                         "(use '0:0' for unstructured or '2:4')")


def _validate_calibration(model: torch.nn.Module, step: LlmcStep, calibration: torch.Tensor | None) -> None:
    if calibration is None or calibration.numel() == 0:
        raise EngineError("bad_dataset", f"{step.kind} needs calibration text: give the job a calibration dataset "
                                         "(token ids, samples x seq_len)")
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise EngineError("bad_dataset", f"calibration must be integer token ids of shape (samples, seq_len), got "
                                         f"{calibration.dtype} {tuple(calibration.shape)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(calibration.min()) < 0 or int(calibration.max()) >= vocab):
        raise EngineError("bad_dataset", f"calibration token ids must lie in [0, {vocab}) for this model's "
                                         f"vocabulary; got {int(calibration.min())}..{int(calibration.max())}: was "
                                         "the text tokenized with this model's tokenizer?")


def _validate_group_size(model: torch.nn.Module, group_size: int, selected: list[str]) -> None:
    """Every targeted layer's input width must be a multiple of group_size (compressed-tensors packs whole groups)."""
    if group_size <= 0:
        raise EngineError("unsupported", f"group_size must be positive or null (per channel), got {group_size}")
    widths = {name: model.get_submodule(name).in_features for name in selected}
    bad = {name: w for name, w in widths.items() if w % group_size}
    if not bad:
        return
    gcd = math.gcd(*widths.values())
    fits = [g for g in (128, 64, 32, 16, 8) if gcd % g == 0 and g < group_size]
    hint = f"group_size {fits[0]} divides every targeted width" if fits else "use group_size null (per channel)"
    by_width: dict[int, list[str]] = {}
    for name, width in bad.items():
        by_width.setdefault(width, []).append(name)
    shown = "; ".join(f"input width {w}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3
                                                                    else "") for w, names in by_width.items())
    raise EngineError("unsupported", f"group_size {group_size} does not divide the input width of {len(bad)} "
                                     f"targeted layers ({shown}): {hint}, or add these layers to ignore")


# ---------------------------------------------------------------------------------------------------------------
# recipes


def _weight_args(step: LlmcStep) -> dict:
    grouped = step.group_size is not None
    return {"num_bits": step.bits, "type": "int", "symmetric": step.symmetric,
            "strategy": "group" if grouped else "channel", "group_size": step.group_size if grouped else None}


def _scheme_name(step: LlmcStep) -> str:
    if step.kind in SPARSE:
        structure = "unstructured" if step.mask_structure == "0:0" else step.mask_structure
        return f"sparse {round(step.sparsity * 100)}% {structure}"
    if step.kind == "w8a8":
        return "W8A8"
    if step.kind == "fp8":
        return "FP8_DYNAMIC"
    return f"W{step.bits}A16" + ("" if step.symmetric else "_ASYM")


def build_recipe(step: LlmcStep, targets: list[str], ignore: list[str]) -> tuple[list, list[str]]:
    """The llm-compressor modifiers for one step, and notes saying what they do."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    groups = {"group_0": {"targets": targets, "weights": _weight_args(step)}}
    if step.kind == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=ignore)], ["round-to-nearest (minmax scales)"]
    if step.kind == "gptq":
        order = "static" if step.act_order else None
        notes = [("act_order: columns quantized in order of activation size (llm-compressor actorder 'static': "
                  "groups stay contiguous, no g_idx, no runtime cost)")] if step.act_order else []
        return [GPTQModifier(config_groups=groups, ignore=ignore, actorder=order)], notes
    if step.kind == "awq":
        return ([AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)],
                ["AWQ scales salient channels (mappings inferred from the architecture), then round-to-nearest"])
    if step.kind == "w8a8":
        return ([SmoothQuantModifier(smoothing_strength=step.smoothing_strength),
                 GPTQModifier(scheme="W8A8", targets=targets, ignore=ignore)],
                [(f"SmoothQuant (strength {step.smoothing_strength}) then GPTQ: int8 per-channel weights, "
                  "dynamic per-token int8 activations; bits/group_size do not apply")])
    if step.kind == "fp8":
        return ([QuantizationModifier(scheme="FP8_DYNAMIC", targets=targets, ignore=ignore)],
                ["FP8 e4m3 per-channel weights, dynamic per-token FP8 activations; data-free"])
    cls = SparseGPTModifier if step.kind == "sparsegpt" else WandaPruningModifier
    return [cls(sparsity=step.sparsity, mask_structure=step.mask_structure, targets=targets, ignore=ignore)], []


def _pipelines(recipe: list) -> dict[str, str]:
    """Which pipeline llm-compressor's default ('independent') runs for each modifier."""
    return {type(m).__name__: ("sequential" if m.requires_calibration_data else "datafree") for m in recipe}


# ---------------------------------------------------------------------------------------------------------------
# running


def _calibration_dataset(calibration: torch.Tensor):
    """Pre-tokenized rows as a `datasets.Dataset` (input_ids, attention_mask): oneshot uses it as is."""
    from datasets import Dataset

    ids = calibration.to(torch.int64).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def _placeholder_tokenizer():
    """oneshot insists on a processor when given a dataset, only to tokenize text; ours is already token ids, so a
    one-word tokenizer built offline stands in (never called) instead of loading one from disk or the hub."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))


@contextlib.contextmanager
def _config_on_disk(model: torch.nn.Module, folder: Path) -> Iterator[None]:
    """Point the model's name_or_path at a folder holding its config.json (llm-compressor reads it), then restore."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    old = model.config._name_or_path
    model.config._name_or_path = str(folder)
    model.name_or_path = str(folder)
    try:
        yield
    finally:
        model.config._name_or_path = old
        model.name_or_path = old


@contextlib.contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached activations (to speed host-to-GPU copies); on a machine with no
    accelerator torch refuses to pin ("Cannot access accelerator device"), so pinning is skipped there."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield
    finally:
        IntermediatesCache._pin_intermediate = original


@contextlib.contextmanager
def _forget_fx_wraps() -> Iterator[None]:
    """llm-compressor's sequential pipeline rewrites each traced forward in a copy of its module's namespace holding
    `self` (the model) and registers the rewritten pieces with `torch.fx.wrap`, whose module-level registry keeps
    that namespace for the life of the process: the whole model stayed resident after the job let it go (a second
    model's worth of memory in the result stage, bench/llm_memory.py). The registrations made during the run are
    dropped when it ends."""
    from torch.fx import _symbolic_trace

    registry = _symbolic_trace._wrapped_fns_to_patch
    before = set(registry)
    try:
        yield
    finally:
        for key in set(registry) - before:
            del registry[key]


def _run_oneshot(model: torch.nn.Module, recipe: list, calibration: torch.Tensor | None, workdir: Path) -> None:
    from llmcompressor import oneshot

    kwargs: dict = {}
    if calibration is not None:
        kwargs = {"dataset": _calibration_dataset(calibration), "processor": _placeholder_tokenizer(),
                  "num_calibration_samples": int(calibration.shape[0]), "max_seq_length": int(calibration.shape[1]),
                  "shuffle_calibration_samples": False, "batch_size": 1}
    with (_config_on_disk(model, workdir / "llmc-config"), _no_pinning_without_accelerator(), _forget_fx_wraps(),
          blame("unsupported", "llm-compressor failed on this model")):
        oneshot(model=model, recipe=recipe, output_dir=None, log_dir=None, **kwargs)


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def apply_llmc(model: torch.nn.Module, step: LlmcStep, calibration: torch.Tensor | None, workdir: Path,
               progress: Callable[[float, str], None] = lambda f, m: None) -> dict:
    """Apply the step IN PLACE to `model` (a transformers *ForCausalLM on CPU, float32 or bf16).
    calibration: int64 token ids (samples, seq_len) or None for data-free kinds (rtn, fp8).
    Returns a JSON-able report: {"library": "llmcompressor <version>", "scheme": e.g. "W4A16"/"W8A8"/"FP8_DYNAMIC"
    or "sparse 50% 2:4", "modules": [names of the Linear modules changed], "ignored": [...],
    "group_size", "symmetric", "calibration": {"samples", "seq_len"} | None, "pipeline": which llm-compressor
    pipeline ran (sequential / basic / datafree), "notes": [str], "seconds": float, "peak_rss_mb": float}.
    Raises EngineError("bad_dataset") if a calibrating kind gets no data, EngineError("unsupported") with an
    actionable message when a group_size does not divide a target layer's input width (name the layer and
    the widths), EngineError("no_effect") when no module matched the targets."""
    import llmcompressor

    started = time.monotonic()
    selected = _validate(model, step, calibration)
    notes: list[str] = []
    if step.kind not in CALIBRATING and calibration is not None:
        notes.append(f"{step.kind} is data-free: the calibration data was not used")
        calibration = None
    targets, ignore = _llmc_targets(model, step, selected)
    recipe, recipe_notes = build_recipe(step, targets, ignore)
    notes += recipe_notes
    pipelines = _pipelines(recipe)
    zeros_before = {n: _zero_fraction(model.get_submodule(n).weight) for n in selected} if step.kind in SPARSE else {}
    Path(workdir).mkdir(parents=True, exist_ok=True)
    progress(0.0, f"llm-compressor {step.kind}: {_scheme_name(step)} on {len(selected)} Linear modules")
    calibrated = sum(1 for p in pipelines.values() if p == "sequential")
    with PeakRss() as rss, layer_progress(model, calibrated, progress):
        _run_oneshot(model, recipe, calibration, Path(workdir))
    model.eval()
    changed, sparsity = _changed_modules(model, step, selected, zeros_before)
    if not changed:
        raise EngineError("no_effect", f"{step.kind} changed none of the {len(selected)} targeted modules")
    if sparsity is not None:
        notes.append(f"sparsity reached on the targeted modules: {sparsity:.4f}")
    progress(1.0, f"llm-compressor {step.kind} done")
    all_linear = [n for n, _ in _linears(model)]
    return {
        "library": f"llmcompressor {llmcompressor.__version__}",
        "kind": step.kind,
        "scheme": _scheme_name(step),
        "modules": changed,
        "ignored": [n for n in all_linear if n not in set(selected)],
        "group_size": step.group_size if step.kind in WEIGHT_GROUPED else None,
        "symmetric": step.symmetric if step.kind in WEIGHT_GROUPED else True,
        "calibration": ({"samples": int(calibration.shape[0]), "seq_len": int(calibration.shape[1])}
                        if calibration is not None else None),
        "pipeline": "sequential" if calibrated else "datafree",
        "pipelines": pipelines,
        "sparsity": sparsity,
        "notes": notes,
        "seconds": round(time.monotonic() - started, 3),
        "peak_rss_mb": rss.growth_mb,
    }


def _changed_modules(model: torch.nn.Module, step: LlmcStep, selected: list[str],
                     zeros_before: dict[str, float]) -> tuple[list[str], float | None]:
    """Modules the step really changed: quantized ones carry a quantization scheme and scales (their forward
    fake-quantizes); pruned ones have more zeros than before. Also the overall sparsity of pruned targets."""
    if step.kind not in SPARSE:
        return [n for n in selected if getattr(model.get_submodule(n), "quantization_scheme", None) is not None
                and hasattr(model.get_submodule(n), "weight_scale")], None
    changed, zeros, total = [], 0, 0
    for name in selected:
        weight = model.get_submodule(name).weight
        if _zero_fraction(weight) > zeros_before[name]:
            changed.append(name)
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    return changed, round(zeros / max(total, 1), 6)
