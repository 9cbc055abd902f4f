"""Model formats, one module each. Importing this package registers them: this list is the allowlist."""

from worker.engine.errors import EngineError
from worker.engine.formats import hf, onnx, package, pt2  # noqa: F401
from worker.engine.formats.base import InputSpec, LoadedModel, ModelFormat, WeightRef, format_names, registered

__all__ = ["InputSpec", "LoadedModel", "ModelFormat", "WeightRef", "get_format", "registered_formats"]


def get_format(name: str) -> ModelFormat:
    fmt = registered(name)
    if fmt is None:
        raise EngineError("unsupported", f"unknown model format {name!r}; known: {format_names()}")
    return fmt


def registered_formats() -> dict[str, ModelFormat]:
    return {name: registered(name) for name in format_names()}
