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
