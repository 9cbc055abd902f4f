"""What every screener shares: the error, the result, the limits and the accepted-format messages."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ACCEPTED_MODELS = (
    "a .pt2 from torch.export.save, a single-file .onnx (torch.onnx.export(..., external_data=False)), "
    "a model package (a zip with model.py defining build_model() and weights.safetensors), "
    "or a Hugging Face folder (a zip of config.json + model.safetensors, from save_pretrained)"
)
ACCEPTED_DATASETS = (
    "a .npz of numeric arrays (numpy.savez, no object arrays) or a .safetensors file; for language models, "
    "UTF-8 text (.txt), JSON Lines with a \"text\" field (.jsonl) or .parquet with a \"text\" column"
)
PICKLE_ADVICE = (
    "pickled torch.save files are refused: they execute code when loaded. Export with torch.export.save "
    "(.pt2), torch.onnx.export (.onnx), or upload a model package (zip with model.py + weights.safetensors)"
)

MAX_DETAIL_ITEMS = 50  # lists in `details` are capped: they go into a DB row
MAX_JSON_BYTES = 64 * 1024 * 1024  # pt2 payload configs and models/*.json parsed here
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
CHUNK = 1024 * 1024

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"


class ScreeningError(Exception):
    """An upload refused by screening; maps onto the API's error body."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def __repr__(self) -> str:
        return f"ScreeningError({self.status}, {self.code!r}, {self.message!r})"


@dataclass
class Sniffed:
    kind: Literal["pt2", "onnx", "package", "hf", "npz", "safetensors", "txt", "jsonl", "parquet"]
    details: dict[str, Any] = field(default_factory=dict)


def truncated(what: str, **details: Any) -> ScreeningError:
    return ScreeningError(422, "truncated", f"{what}: the file is truncated or corrupt; upload it again", details)


def unsupported(accepted: str, why: str = "unrecognised file format", **details: Any) -> ScreeningError:
    return ScreeningError(415, "unsupported_format", f"{why}; upload {accepted}", {"accepted": accepted, **details})


def read_head(path: Path, accepted: str, n: int = 16) -> tuple[bytes, int]:
    """An upload's first bytes and its size; an empty file is refused."""
    with open(path, "rb") as f:
        head = f.read(n)
        size = f.seek(0, 2)
    if size == 0:
        raise unsupported(accepted, "empty file")
    return head, size


def is_zip(head: bytes) -> bool:
    return head.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC))


def looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= min(MAX_SAFETENSORS_HEADER, size - 8) and head[8:9] == b"{"
