"""Model formats, one module each. Importing this package registers them: this list is the allowlist."""

from worker.engine.formats import hf, onnx, package, pt2  # noqa: F401
from worker.engine.formats.base import InputSpec, LoadedModel, ModelFormat, WeightRef, get_format, registered_formats

__all__ = ["InputSpec", "LoadedModel", "ModelFormat", "WeightRef", "get_format", "registered_formats"]
