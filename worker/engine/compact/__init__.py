"""Compact safetensors output: `storage` is the standalone file format; here, the engine's side of it.

`write_model` stores a loaded model's parameters and buffers (`stored_tensors`) and proves the file
restores them bit-exactly; `restore_into` puts a compact file's tensors back into a freshly loaded model of the
input format, which is how the sandbox runs a safetensors artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from worker.engine.compact.storage import load_compact, read_manifest, write_compact
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel

__all__ = ["load_compact", "read_manifest", "restore_into", "write_compact", "write_model"]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def stored_tensors(model: LoadedModel) -> list[tuple[str, torch.Tensor]]:
    """What a compact file holds: parameters and buffers (batch-norm running statistics re-estimated by a step
    must travel with the weights), as the live tensors of the model so restoring writes them in place."""
    if model.format in ("package", "hf"):
        return list(model.handle.state_dict().items())
    if model.format == "pt2":
        return list(model.handle.state_dict.items())
    return get_format(model.format).parameters(model)


def write_model(model: LoadedModel, path: Path) -> dict:
    """Write every parameter and buffer of `model` to one compact file; return the manifest. Checks the round
    trip."""
    params = stored_tensors(model)
    manifest = write_compact({name: t for name, t in params}, path)
    restored = load_compact(path)
    for name, t in params:
        if not _same(restored[name], _numpy(t)):
            raise RuntimeError(f"compact storage did not restore {name!r} exactly")
    return manifest


def restore_into(model: LoadedModel, tensors: dict[str, np.ndarray]) -> list[str]:
    """Overwrite `model`'s parameters with `tensors` (by name) in place; return the names written.

    Every parameter must be present with its shape: a compact file only fits the architecture it came from
    (not, for example, the original after channel pruning).
    """
    params = stored_tensors(model)
    problems = [f"{n} {list(t.shape)} (file: {list(tensors[n].shape) if n in tensors else 'missing'})"
                for n, t in params if n not in tensors or tuple(tensors[n].shape) != tuple(t.shape)]
    if problems:
        raise EngineError("unsupported", "the compact safetensors file does not fit the input model's architecture: "
                                         + "; ".join(problems[:10]))
    if model.format == "onnx":
        from onnx import numpy_helper

        for init in model.handle.graph.initializer:
            if init.name in tensors and init.name in dict(params):
                dtype = numpy_helper.to_array(init).dtype
                init.CopyFrom(numpy_helper.from_array(np.asarray(tensors[init.name]).astype(dtype), init.name))
    else:  # torch formats: parameters() are the tensors the module computes with
        with torch.no_grad():
            for name, t in params:
                t.copy_(torch.from_numpy(np.require(tensors[name], requirements="C")).to(t.dtype))
    for name, t in stored_tensors(model):  # read back: the model now holds the file's values
        if not torch.equal(t.detach().cpu(), torch.from_numpy(np.require(tensors[name], requirements="C")).to(t.dtype)):
            raise RuntimeError(f"restoring {name!r} into the {model.format} model did not take effect")
    return [n for n, _ in params]
