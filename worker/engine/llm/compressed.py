"""compressed-tensors folders: a model after llm-compressor's steps written as vLLM loads it, and read back."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from worker.engine.errors import blame
from worker.engine.llm.llmc import _config_on_disk, _linears, _zero_fraction


def _is_llmc_model(model: torch.nn.Module) -> bool:
    return bool(getattr(model.save_pretrained, "_overridden", False))


def save_compressed(model: torch.nn.Module, out_folder: Path) -> list[str]:
    """Write the model as an HF folder in compressed-tensors format (what vLLM loads): config.json with
    quantization_config, safetensors weights packed (pack-quantized int4 etc.). Returns notes (e.g. the compression
    format used). A model with no llm-compressor step: plain save_pretrained.

    compressed-tensors packs the in-memory model while saving; it is unpacked again right after (same values), so
    the model keeps its float `weight` tensors and stays usable."""
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    if not _is_llmc_model(model):
        model.save_pretrained(out_folder)
        return ["no llm-compressor step: plain save_pretrained (dense safetensors)"]
    pruned = any(_zero_fraction(m.weight) >= 0.25 for _, m in _linears(model)  # before packing replaces weights
                 if getattr(m, "weight", None) is not None and m.weight.dtype.is_floating_point)
    scratch = Path(tempfile.mkdtemp(prefix=".llmc-config-", dir=out_folder.parent))
    try:
        with _config_on_disk(model, scratch):
            model.save_pretrained(str(out_folder), save_compressed=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _decompress_in_memory(model)
    return _save_notes(out_folder, pruned)


def _decompress_in_memory(model: torch.nn.Module) -> None:
    """Undo the packing save_pretrained did in memory (compressed-tensors would otherwise only unpack on the next
    forward, leaving Linear modules without a `weight` until then)."""
    if hasattr(model, "ct_decompress_hook"):
        from compressed_tensors import ModelCompressor

        ModelCompressor.from_pretrained_model(model).decompress_model(model)


def _save_notes(out_folder: Path, pruned: bool) -> list[str]:
    qconfig = json.loads((out_folder / "config.json").read_text()).get("quantization_config")
    notes = [f"compressed-tensors {qconfig.get('version')}: format {qconfig.get('format')}" if qconfig
             else "no quantization: dense safetensors"]
    if pruned:
        notes.append("pruned weights are stored as they are (zeros included): compressed-tensors 0.19 has no sparse "
                     "storage format")
    return notes


def load_compressed(folder: Path) -> torch.nn.Module:
    """Reload such a folder with transformers on CPU (local files only, trust_remote_code=False), eval mode.
    Quantized weights are decompressed to the model's float dtype (the values the quantized model computes with)."""
    from transformers import AutoModelForCausalLM

    with blame("bad_model", f"cannot load the compressed model folder {Path(folder).name}"):
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return model.eval()
