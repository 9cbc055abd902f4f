"""A step's data: which of the job's datasets it uses, its arrays in the model's input order, batches, the loss
against labels."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from worker.engine.datasets import Dataset, arrange
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel


def data_source(datasets: dict[str, Dataset], preferred: str) -> tuple[Dataset | None, str | None]:
    """The step's dataset, else another one of the job's (eval last: statistics estimated on the data that
    measures accuracy flatter it). The report names the one used."""
    for name in (preferred, "train", "calibration", "eval"):
        if datasets.get(name) is not None:
            return datasets[name], name
    return None, None


def fallback_note(preferred: str, used: str, measured: str) -> str | None:
    """The note when a step's data came from another dataset than it asked for (on `eval`, the data `measured`
    says what is measured on, the figures may flatter the result), or None."""
    if used == preferred:
        return None
    return f"no {preferred!r} dataset: calibrated on the {used!r} dataset" + \
        (f" ({measured}: the figures may flatter the result)" if used == "eval" else "")


def dataset_arrays(model: LoadedModel, data: Dataset) -> list[np.ndarray]:
    return arrange(data, get_format(model.format).input_specs(model))


def batches(arrays: list[np.ndarray], size: int, limit: int | None = None):
    n = arrays[0].shape[0] if limit is None else min(limit, arrays[0].shape[0])
    for start in range(0, n, size):
        yield start, [torch.from_numpy(np.ascontiguousarray(a[start:min(start + size, n)])) for a in arrays]


def classification_loss(out: torch.Tensor, y: torch.Tensor, index: int, what: str,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class scores (N, classes) against integer labels, or EngineError("bad_dataset")."""
    if out.ndim != 2:
        raise EngineError("bad_dataset", f"steps[{index}]: {what} needs class scores (N, classes) as the model "
                                         f"output, got shape {tuple(out.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
        raise EngineError("bad_dataset", f"steps[{index}]: labels must be class ids in [0, {out.shape[1]}), got "
                                         f"[{int(y.min())}, {int(y.max())}]")
    return nn.functional.cross_entropy(out, y, reduction=reduction)


def calibration_chunks(arrays: list[np.ndarray], step: int, fixed: bool) -> list[list[np.ndarray]]:
    """The samples in batches of `step`; a fixed-batch model (`fixed`) gets the last one padded to `step` by
    repeating samples, as it takes no other batch size."""
    n = arrays[0].shape[0]
    chunks = []
    for s in range(0, n, step):
        idx = np.arange(s, s + step) % n if fixed else np.arange(s, min(s + step, n))
        chunks.append([np.ascontiguousarray(a[idx]) for a in arrays])
    return chunks


def fixed_batch_hint(message: str) -> str:
    """A failure message, with what to change when it is a model frozen to one batch size refusing another."""
    shape_refused = ("invalid dimensions", "shape[0] to be equal to")  # ONNX Runtime's, torch.export's guard's
    if any(s in message for s in shape_refused):
        return message + ('; if the model was exported with a fixed batch, export it with dynamic_shapes={"x": '
                          '{0: torch.export.Dim("batch")}} and an example of batch >= 2')
    return message
