"""The protobuf wire format, read field by field over a buffer (bytes or an mmap): no schema, no decoding library."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class WireError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind  # "truncated" or "invalid"


def varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated", "varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("invalid", "varint too long")


def fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yields (field, wire_type, value) for each field in buf[pos:end]: the int of a varint, the (start, end) span
    of a length-delimited field, None for fixed32/fixed64."""
    while pos < end:
        key, pos = varint(buf, pos, end)
        fnum, wt = key >> 3, key & 7
        if fnum == 0:
            raise WireError("invalid", "field number 0")
        if wt == 0:
            val, pos = varint(buf, pos, end)
            yield fnum, wt, val
        elif wt in (1, 5):
            width = 8 if wt == 1 else 4
            if pos + width > end:
                raise WireError("truncated", f"fixed{width * 8} runs past the end")
            pos += width
            yield fnum, wt, None
        elif wt == 2:
            n, pos = varint(buf, pos, end)
            if pos + n > end:
                raise WireError("truncated", f"field {fnum} length {n} runs past the end")
            yield fnum, wt, (pos, pos + n)
            pos += n
        else:
            raise WireError("invalid", f"field {fnum} has wire type {wt}")


def text(buf: Any, span: tuple[int, int], limit: int) -> str:
    """A string field, at most `limit` bytes of it."""
    return bytes(buf[span[0]:min(span[1], span[0] + limit)]).decode("utf-8", "replace")


def signed64(value: int) -> int:
    """An int64 field: negative numbers travel as their 64-bit two's complement."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value
