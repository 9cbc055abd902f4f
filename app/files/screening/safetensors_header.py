"""safetensors files (a dataset, or the weights in a model package or a Hugging Face folder): the header checked the
way the safetensors library reads it, the tensor data never parsed."""

from __future__ import annotations

import json
import math
import struct
from typing import IO, Any

from app.files.screening.common import MAX_DETAIL_ITEMS, MAX_SAFETENSORS_HEADER, ScreeningError, truncated

_SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                     "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                     "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def check_safetensors(stream: IO[bytes], size: int, label: str) -> dict[str, Any]:
    """Validates a safetensors header (length, JSON, dtypes, offsets covering the buffer) as the library does."""
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise truncated(label)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_SAFETENSORS_HEADER or n == 0:
        raise ScreeningError(422, "invalid_safetensors", f"{label}: header length {n} is not valid", {"entry": label})
    if 8 + n > size:
        raise truncated(label, header_bytes=n, size=size)
    raw = stream.read(n)
    if len(raw) < n:
        raise truncated(label)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ScreeningError(422, "invalid_safetensors", f"{label}: header is not JSON ({exc})", {"entry": label}) from None
    if not isinstance(header, dict):
        raise ScreeningError(422, "invalid_safetensors", f"{label}: header is not a JSON object", {"entry": label})
    buffer_len = size - 8 - n
    tensors: list[tuple[int, int, str]] = []
    info: dict[str, Any] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                raise ScreeningError(422, "invalid_safetensors", f"{label}: __metadata__ must map strings to strings",
                                     {"entry": label})
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                  and all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: bad entry for tensor {key!r}",
                                 {"entry": label, "tensor": key})
        bits = _SAFETENSORS_BITS.get(dtype)
        if bits is None:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: tensor {key!r} has unknown dtype {dtype!r}",
                                 {"entry": label, "tensor": key})
        nbits = math.prod(shape) * bits
        if nbits % 8 or end < begin or end - begin != nbits // 8:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: tensor {key!r} offsets do not match its shape",
                                 {"entry": label, "tensor": key})
        tensors.append((begin, end, key))
        if len(info) < MAX_DETAIL_ITEMS:
            info[key] = {"dtype": dtype, "shape": shape}
    pos = 0
    for begin, end, key in sorted(tensors):
        if begin != pos:
            raise ScreeningError(422, "invalid_safetensors", f"{label}: tensor {key!r} overlaps or leaves a gap",
                                 {"entry": label, "tensor": key})
        pos = end
    if pos != buffer_len:
        if pos > buffer_len:
            raise truncated(label, expected_bytes=8 + n + pos, size=size)
        raise ScreeningError(422, "invalid_safetensors", f"{label}: data past the last tensor", {"entry": label})
    return {"tensor_count": len(tensors), "tensors": info}
