"""Hugging Face folders: a zip of config.json + model.safetensors (or shards + index). No user code runs.

The architecture comes from transformers' own auto mappings (an allowlist of auto classes, resolved from the
config's model_type and architectures[0]); configs with `auto_map` (remote code) are refused. The handle is the
transformers model itself (an eager nn.Module), so structural passes and `save_pretrained` work on it.
Inputs: `input_ids` (int64, (batch, seq)); the runner returns the logits (first model output).
"""

from __future__ import annotations

import itertools
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.errors import EngineError, blame
from worker.engine.formats import _torch
from worker.engine.formats.base import (
    InputSpec,
    LoadedModel,
    ModelFormat,
    Runner,
    WeightRef,
    register,
)
from worker.engine.formats.package import _extract_checked

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_counter = itertools.count()
DEFAULT_SEQ_LEN = 128  # tokens per row when a model is timed without a dataset
# MLP up-projections: the only layers channel pruning may cut (their width is config.intermediate_size).
_MLP_UP = ("intermediate.dense",)


def _auto_classes() -> list[Any]:
    """The allowlist of auto classes a config may resolve through, most specific first."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    return [AutoModelForSequenceClassification, AutoModelForImageClassification, AutoModelForCausalLM, AutoModel]


def _find_folder(root: Path) -> Path:
    if (root / CONFIG).is_file():
        return root
    tops = [p for p in root.iterdir() if p.name != "__MACOSX"]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / CONFIG).is_file():
        return tops[0]
    raise EngineError("bad_model", f"the Hugging Face zip has no {CONFIG} at its root")


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError("bad_model", f"{CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EngineError("bad_model", f"{CONFIG} is not a JSON object")
    if "auto_map" in raw:
        raise EngineError("bad_model", f"{CONFIG} has auto_map (remote code); only architectures built into "
                                       "transformers are accepted")
    model_type = raw.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise EngineError("bad_model", f"{CONFIG}: unknown model_type {model_type!r}")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as exc:
        raise EngineError("bad_model", f"{CONFIG} does not make a {model_type} config: {type(exc).__name__}: "
                                       f"{exc}") from exc


def _model_class(config: Any) -> tuple[Any, str]:
    """(auto class, class name) from the allowlisted auto mappings; never imports a class named by the user."""
    archs = getattr(config, "architectures", None) or []
    wanted = archs[0] if archs else None
    for auto in _auto_classes():
        mapping = auto._model_mapping
        if type(config) not in mapping:
            continue
        cls = mapping[type(config)]
        if wanted is None or cls.__name__ == wanted:
            return auto, cls.__name__
    raise EngineError("unsupported", f"architecture {wanted!r} ({config.model_type}) is not one of the supported "
                                     "auto classes (sequence classification, image classification, causal LM, base "
                                     "model)")


def is_causal_lm(model: LoadedModel) -> bool:
    """A Hugging Face decoder LM (built through AutoModelForCausalLM): judged by perplexity (worker/engine/llm)."""
    return model.format == "hf" and bool(model.extra.get("causal_lm"))


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names (each checked to be a .safetensors file in the folder)."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if not (folder / INDEX).is_file():
        raise EngineError("bad_model", f"the Hugging Face zip has neither {WEIGHTS} nor {INDEX}")
    try:
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EngineError("bad_model", f"{INDEX} is not a valid shard index: {exc}") from exc
    files = []
    for name in names:
        p = (folder / name).resolve()
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors") \
                or p.parent != folder.resolve() or not p.is_file():
            raise EngineError("bad_model", f"{INDEX} names a missing or invalid shard {name!r}")
        files.append(p)
    return files


def _load_weights(net: torch.nn.Module, files: list[Path]) -> torch.dtype | None:
    """The files' tensors copied into the model one at a time (read, not mapped: peak memory stays the model plus
    one tensor), strict except for weights HF ties to others (saved once, re-tied after loading). Returns the
    checkpoint's floating dtype."""
    from safetensors import safe_open

    targets = net.state_dict(keep_vars=True)
    seen, unexpected, dtype = set(), [], None
    for f in files:
        try:
            with safe_open(str(f), framework="pt", backend="pread") as sf:
                for key in sf.keys():  # noqa: SIM118  (a safe_open, not a dict)
                    if key not in targets:
                        unexpected.append(key)
                        continue
                    tensor = sf.get_tensor(key)
                    if tensor.shape != targets[key].shape:
                        raise EngineError("bad_model", f"{f.name}: {key} has shape {list(tensor.shape)}, the config's "
                                                       f"architecture wants {list(targets[key].shape)}")
                    dtype = dtype or (tensor.dtype if tensor.is_floating_point() else None)
                    with torch.no_grad():
                        targets[key].copy_(tensor)
                    seen.add(key)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError("bad_model", f"cannot read {f.name}: {type(exc).__name__}: {exc}") from exc
    tied = set(getattr(net, "all_tied_weights_keys", None) or {})
    missing = [k for k in targets if k not in seen and k not in tied]
    if missing or unexpected:
        raise EngineError("bad_model", f"the safetensors weights do not match the config's architecture: missing "
                                       f"{missing[:10]}, unexpected {unexpected[:10]}")
    if tied and hasattr(net, "tie_weights"):
        net.tie_weights()
    return dtype


@dataclass
class AttentionHeads:
    """One self-attention block: the projections whose output rows come in `head_size` blocks per head, the
    output projection whose input columns do, and the module whose head count follows them."""

    name: str
    module: torch.nn.Module
    query: torch.nn.Linear
    key: torch.nn.Linear
    value: torch.nn.Linear
    output: torch.nn.Linear
    head_size: int


class _Logits(torch.nn.Module):
    """input_ids -> logits (or the first output): a plain tensor graph for torch.export and ONNX."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=input_ids, return_dict=True)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]


@register
class HFFormat(ModelFormat):
    name = "hf"
    suffix = ".zip"
    runtimes = ("torch", "torch-compile")

    def load(self, path: Path, workdir: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
        """`dtype`: what the model computes in (float32 unless a caller times an LM as served, in its checkpoint's
        dtype)."""
        folder = _find_folder(_extract_checked(path, workdir / f"hf-{next(_counter)}", "Hugging Face zip"))
        if any(p.suffix == ".py" for p in folder.rglob("*")):
            raise EngineError("bad_model", "the Hugging Face zip holds Python files; custom code is not run")
        try:
            config = _read_config(folder)
            auto, cls_name = _model_class(config)
            # float32 whatever the checkpoint's dtype: the original is measured and calibrated in full precision
            net = None if getattr(config, "quantization_config", None) else auto.from_config(config, dtype=dtype)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError("bad_model", f"cannot build the model from {CONFIG}: {type(exc).__name__}: "
                                           f"{exc}") from exc
        checkpoint_dtype = None
        if net is None:  # a compressed-tensors folder (written by llm-compressor): transformers decompresses it
            from worker.engine.llm.compressed import load_compressed

            with blame("bad_model", "cannot load the compressed-tensors folder"):
                net = load_compressed(folder)
        else:
            checkpoint_dtype = _load_weights(net, _weight_files(folder))
        net.eval()
        from transformers import AutoModelForCausalLM

        return LoadedModel(format=self.name, path=path, handle=net,
                           extra={"folder": folder, "architecture": cls_name, "checkpoint_dtype": checkpoint_dtype,
                                  "causal_lm": auto is AutoModelForCausalLM})

    def save(self, model: LoadedModel, path: Path) -> None:
        from transformers.utils import logging as hf_logging

        if model.extra.get("heads_pruned"):  # also refused at submit; this guards the engine's own callers
            raise EngineError("unsupported", f"{model.extra['heads_pruned']} removed attention heads, which a Hugging "
                                             "Face config cannot describe: write pt2 or onnx")

        hf_logging.disable_progress_bar()
        net = model.handle
        out = path.with_name(path.name + ".folder")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        sync_config(net)
        # A causal LM is computed in float32 here and written in its checkpoint's 16-bit dtype, as it came: the
        # weights no step quantized keep their size (LLM folders are bf16/fp16; float32 would double them).
        dtype = model.extra.get("checkpoint_dtype") if is_causal_lm(model) else None
        dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        if dtype is not None:
            net.to(dtype)
        try:
            if model.extra.get("llmc"):  # llm-compressor's steps: packed weights + quantization_config (vLLM)
                from worker.engine.llm.compressed import save_compressed

                save_compressed(net, out)
            else:
                net.save_pretrained(str(out), safe_serialization=True)
        finally:
            if dtype is not None:
                net.to(torch.float32)
        _copy_tokenizer(model.extra.get("folder"), out)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(out.iterdir()):
                if f.is_file():
                    zf.write(f, f.name)
        import shutil

        shutil.rmtree(out)

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None) -> list[str]:
        if target == self.name:
            self.save(model, path)
            return []
        if target == "gguf":
            from worker.engine.llm.gguf_io import write_gguf

            if not is_causal_lm(model):
                raise EngineError("unsupported", "GGUF (llama.cpp) holds causal LMs; this Hugging Face model is "
                                                 f"a {model.extra.get('architecture')}")
            return write_gguf(model.handle, model.extra.get("folder"), path, model.extra.get("gguf_type", "q8_0"))
        if examples is None:
            raise EngineError("bad_dataset", f"writing a Hugging Face model as {target} needs example input_ids: "
                                             "give an eval dataset")
        wrapper = _Logits(model.handle).eval()
        examples = [np.ascontiguousarray(examples[0]).astype(np.int64)]
        if target == "onnx":
            return _torch.export_onnx(wrapper, examples, path, dynamic_batch=True)
        if target == "pt2":
            from worker.engine.formats.package import PackageFormat

            return PackageFormat._export_pt2(PackageFormat(), wrapper, examples, path)
        raise EngineError("unsupported", f"a Hugging Face model cannot be written as {target}")

    def eligible_weights(self, model: LoadedModel) -> list[WeightRef]:
        """Linear weights (attention q/k/v/out, MLP, pooler, classifier); not embeddings or layer norms. A causal
        LM's output head (lm_head, often the embedding matrix itself) is left out, as llm-compressor does."""
        refs, seen = [], set()
        head = model.handle.get_output_embeddings() if is_causal_lm(model) else None
        if head is not None:
            seen.add(id(head.weight))
        for mod_name, mod in model.handle.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and isinstance(w, torch.nn.Parameter) \
                    and w.ndim >= 2 and id(w) not in seen:
                seen.add(id(w))
                refs.append(_torch.tensor_ref(f"{mod_name}.weight", w))
        return refs

    def parameters(self, model: LoadedModel) -> list[tuple[str, torch.Tensor]]:
        return list(model.handle.named_parameters())

    def input_specs(self, model: LoadedModel) -> list[InputSpec] | None:
        # Sequence length is free (up to max_position_embeddings): datasets decide it.
        return [InputSpec("input_ids", (None, None), np.dtype(np.int64))]

    def default_inputs(self, model: LoadedModel, batch: int, seq_len: int = DEFAULT_SEQ_LEN) -> list[np.ndarray]:
        """Random token ids for timing a model given no dataset: `batch` rows of min(seq_len, context) tokens."""
        config = model.handle.config
        context = next((v for k in ("max_position_embeddings", "n_positions") if isinstance(
            v := getattr(config, k, None), int) and v > 0), seq_len)
        vocab = int(getattr(config, "vocab_size", None) or 2)
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab, size=(batch, min(seq_len, context)), dtype=np.int64)]

    def runner(self, model: LoadedModel, runtime: str, threads: int) -> Runner:
        return _torch.module_runner(model.handle, threads, runtime)

    # Hooks for channel pruning (worker/engine/passes/channel.py).
    def channel_prunable(self, model: LoadedModel) -> set[str]:
        """Layers whose output features may be removed: the MLP up-projections (intermediate width)."""
        return {name for name, mod in model.handle.named_modules()
                if isinstance(mod, torch.nn.Linear) and name.endswith(_MLP_UP)}

    def attention_heads(self, model: LoadedModel) -> list[AttentionHeads]:
        """Self-attention blocks laid out as BERT's (BertAttention: self.query/key/value + output.dense), the
        layout of the BERT family (RoBERTa, ELECTRA, DistilRoBERTa...), whose forward infers the head count
        from the projection width, so removing heads needs no config change at run time."""
        groups = []
        for name, mod in model.handle.named_modules():
            attn, out = getattr(mod, "self", None), getattr(getattr(mod, "output", None), "dense", None)
            projections = [getattr(attn, p, None) for p in ("query", "key", "value")]
            head_size = getattr(attn, "attention_head_size", None)
            if isinstance(out, torch.nn.Linear) and isinstance(head_size, int) \
                    and all(isinstance(p, torch.nn.Linear) for p in projections) \
                    and all(p.out_features == out.in_features for p in projections):
                groups.append(AttentionHeads(name=name, module=attn, query=projections[0], key=projections[1],
                                             value=projections[2], output=out, head_size=head_size))
        return groups

    def after_channel_prune(self, model: LoadedModel) -> list[str]:
        """Write the new widths into the config so save_pretrained + from_pretrained rebuild this architecture."""
        return sync_config(model.handle)


def _copy_tokenizer(source: Path | None, out: Path) -> None:
    """The uploaded folder's tokenizer files into the written one, so it runs as it came (vLLM, llama.cpp)."""
    import shutil

    from worker.engine.text import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, "generation_config.json") if source else ():
        if (source / name).is_file() and not (out / name).exists():
            shutil.copyfile(source / name, out / name)


def sync_config(net: torch.nn.Module) -> list[str]:
    """config.intermediate_size from the MLP layers; EngineError if layers differ (one config value)."""
    config = getattr(net, "config", None)
    widths = {mod.out_features for name, mod in net.named_modules()
              if isinstance(mod, torch.nn.Linear) and name.endswith(_MLP_UP)}
    if config is None or not widths or not hasattr(config, "intermediate_size"):
        return []
    if len(widths) != 1:
        raise EngineError("unsupported", f"MLP widths differ across layers ({sorted(widths)}); a Hugging Face config "
                                         "has one intermediate_size")
    width = widths.pop()
    if width == config.intermediate_size:
        return []
    old = config.intermediate_size
    config.intermediate_size = width
    return [f"hf: config.intermediate_size {old} -> {width}"]
