"""A model's input tensors as screening reports them (`details.inputs`), and the fixed-batch warning."""

from __future__ import annotations

from typing import Any

from app.files.screening.common import MAX_DETAIL_ITEMS

MAX_NAME_CHARS = 200


def tensor_input(name: Any, dtype: str | None, shape: list[int | str]) -> dict[str, Any]:
    """One input: its name, dtype (torch's spelling: float32, int64, ...) and shape, each dim an int or, when
    symbolic, a string (the exporter's name for it: "batch", "s77"; "?" when unnamed)."""
    return {"name": str(name)[:MAX_NAME_CHARS], "dtype": dtype, "shape": shape}


def fixed_batch_warning(inputs: list[dict[str, Any]], advice: str) -> str | None:
    """A warning when no input has a symbolic first dimension: the model then only takes that batch size."""
    batched = [i for i in inputs if i["shape"]]
    if not batched or any(not isinstance(i["shape"][0], int) for i in batched):
        return None
    return (f"fixed_batch: the model's batch is fixed at {batched[0]['shape'][0]} (input {batched[0]['name']!r} has "
            f"shape {batched[0]['shape']}); export with a dynamic batch: {advice}")


def inputs_details(inputs: list[dict[str, Any]] | None, advice: str) -> dict[str, Any]:
    """The details entries for a model's inputs: none when they could not be read."""
    if inputs is None:
        return {}
    details: dict[str, Any] = {"inputs": inputs[:MAX_DETAIL_ITEMS]}
    warning = fixed_batch_warning(inputs, advice)
    if warning:
        details["warnings"] = [warning]
    return details
