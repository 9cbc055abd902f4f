"""Datasets: .npz (no pickles) or .safetensors arrays; `labels` optional, the other keys are model inputs."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.formats.base import InputSpec

LABELS = "labels"


@dataclass
class Dataset:
    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


def load_dataset(path: Path, name: str) -> Dataset:
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = dict(load_file(str(path)))
        else:
            with np.load(str(path), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise EngineError("bad_dataset", f"cannot read dataset {name!r} ({path.name}): {exc}") from exc
    labels = arrays.pop(LABELS, None)
    if not arrays:
        raise EngineError("bad_dataset", f"dataset {name!r} has no input arrays (only {LABELS!r})")
    sizes = {k: a.shape[0] if a.ndim else None for k, a in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise EngineError("bad_dataset", f"dataset {name!r}: inputs need the same first (sample) dim, got {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise EngineError("bad_dataset", f"dataset {name!r} is empty")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
            raise EngineError("bad_dataset", f"dataset {name!r}: {LABELS!r} must be {n} integer class ids, got "
                                             f"shape {labels.shape} {labels.dtype}")
    return Dataset(name=name, inputs=arrays, labels=labels)


def arrange(dataset: Dataset, specs: list[InputSpec] | None) -> list[np.ndarray]:
    """The dataset's arrays in the model's input order, cast to the model's dtypes, shapes checked."""
    keys = sorted(dataset.inputs)
    if specs:
        names = [s.name for s in specs]
        if len(specs) == 1 and len(keys) == 1:
            keys = keys[:1]
        elif set(names) <= set(keys):
            extra = sorted(set(keys) - set(names))
            if extra:  # dropping e.g. an attention_mask silently would measure the model on different inputs
                raise EngineError("bad_dataset", f"dataset {dataset.name!r} has inputs {extra} the model does not "
                                                 f"take (it takes {names}); remove them from the dataset")
            keys = names  # matched by name (ONNX input names)
        elif len(keys) != len(specs):
            raise EngineError("bad_dataset", f"dataset {dataset.name!r} has inputs {keys}, the model takes "
                                             f"{len(specs)} ({names})")
    arrays = []
    for i, key in enumerate(keys):
        a = dataset.inputs[key]
        spec = specs[i] if specs else None
        if spec is not None and spec.dtype is not None and a.dtype != spec.dtype:
            if np.issubdtype(a.dtype, np.floating) != np.issubdtype(spec.dtype, np.floating):
                raise EngineError("bad_dataset", f"dataset input {key!r} is {a.dtype}, the model wants {spec.dtype}")
            a = a.astype(spec.dtype)
        elif spec is None and a.dtype == np.float64:
            a = a.astype(np.float32)  # torch layers are float32; numpy defaults to float64
        if spec is not None and spec.shape is not None:
            want = spec.shape[1:]
            got = a.shape[1:]
            if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
                raise EngineError("bad_dataset", f"dataset input {key!r} has sample shape {tuple(got)}, the model "
                                                 f"input {spec.name!r} wants {tuple(want)} (None = any)")
        arrays.append(np.ascontiguousarray(a))
    return arrays


def synthetic_inputs(specs: list[InputSpec] | None, examples: list[np.ndarray] | None, batch: int,
                     seed: int = 0) -> list[np.ndarray] | None:
    """Random inputs of the model's shapes, for latency when there is no dataset; None if shapes are unknown."""
    rng = np.random.default_rng(seed)
    if examples:
        shapes = [(a.shape[1:], a.dtype) for a in examples]
    elif specs and all(s.shape is not None and all(d is not None for d in s.shape[1:]) for s in specs):
        shapes = [(tuple(s.shape[1:]), s.dtype or np.dtype(np.float32)) for s in specs]
    else:
        return None
    out = []
    for shape, dtype in shapes:
        if np.issubdtype(dtype, np.floating):
            out.append(rng.random((batch, *shape), dtype=np.float32).astype(dtype))
        else:
            out.append(np.zeros((batch, *shape), dtype=dtype))
    return out
