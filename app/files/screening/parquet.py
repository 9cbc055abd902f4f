"""Parquet text datasets: "PAR1" at both ends, a footer of sane length, and the footer's schema (Thrift compact
protocol, walked here as data with the standard library: the API does not depend on pyarrow) holding a top-level
string column "text". The sandbox reads that column with pyarrow; the pages themselves are never read here."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from app.files.screening.common import MAX_DETAIL_ITEMS, MAX_JSON_BYTES, ScreeningError, Sniffed, truncated
from app.files.screening.text import TOKENIZED_NOTE, empty_text

MAGIC = b"PAR1"
MAX_FOOTER_BYTES = MAX_JSON_BYTES
MAX_DEPTH = 32  # nesting of Thrift structs and lists in a footer (parquet's own stays under 10)
# Thrift compact types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)
_PHYSICAL = ["BOOLEAN", "INT32", "INT64", "INT96", "FLOAT", "DOUBLE", "BYTE_ARRAY", "FIXED_LEN_BYTE_ARRAY"]
_BYTE_ARRAY = 6
_FIXED_SIZES = {_BYTE: 1, _DOUBLE: 8}


def looks_like_parquet(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _invalid(why: str, details: dict[str, Any] | None = None) -> ScreeningError:
    return ScreeningError(422, "invalid_parquet", f"parquet: {why}", details or {})


class _Reader:
    """A cursor over the footer bytes; every read is bounds-checked (a hostile footer ends in a 422, never past)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _invalid("the footer is corrupt (a field runs past its end); write the file again")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = shift = 0
        while shift < 70:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise _invalid("the footer is corrupt (an overlong integer); write the file again")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def list_header(self) -> tuple[int, int]:
        b = self.byte()
        size = b >> 4
        return (self.varint() if size == 15 else size), b & 0x0F

    def fields(self):
        """Yields (field id, type) for each field of a struct, up to its STOP."""
        last = 0
        while True:
            b = self.byte()
            kind = b & 0x0F
            if kind == _STOP:
                return
            delta = b >> 4
            last = last + delta if delta else self.zigzag()
            yield last, kind

    def skip(self, kind: int, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise _invalid("the footer nests too deeply; write the file again")
        if kind in (_TRUE, _FALSE):
            return
        if kind in _FIXED_SIZES:
            self.take(_FIXED_SIZES[kind])
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _BINARY:
            self.take(self.varint())
        elif kind in (_LIST, _SET):
            size, elem = self.list_header()
            for _ in range(size):
                self.skip(_BYTE if elem in (_TRUE, _FALSE) else elem, depth + 1)  # list bools take a byte each
        elif kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.skip(types >> 4, depth + 1)
                    self.skip(types & 0x0F, depth + 1)
        elif kind == _STRUCT:
            for _, field_kind in self.fields():
                self.skip(field_kind, depth + 1)
        else:
            raise _invalid(f"the footer is corrupt (unknown Thrift type {kind}); write the file again")


def _schema_element(r: _Reader) -> dict[str, Any]:
    """One SchemaElement: its type (1), name (4) and num_children (5); the other fields skipped."""
    element: dict[str, Any] = {"type": None, "name": None, "children": 0}
    for fid, kind in r.fields():
        if fid == 1 and kind == _I32:
            element["type"] = r.zigzag()
        elif fid == 4 and kind == _BINARY:
            element["name"] = r.take(r.varint()).decode("utf-8", "replace")
        elif fid == 5 and kind == _I32:
            element["children"] = r.zigzag()
        else:
            r.skip(kind)
    return element


def _file_metadata(footer: bytes) -> tuple[list[dict[str, Any]], int | None, int]:
    """FileMetaData -> (schema elements, num_rows, number of row groups)."""
    r = _Reader(footer)
    schema: list[dict[str, Any]] = []
    num_rows: int | None = None
    row_groups = 0
    for fid, kind in r.fields():
        if fid == 2 and kind == _LIST:
            size, elem = r.list_header()
            if elem != _STRUCT:
                raise _invalid("the footer's schema is not a list of columns; write the file again")
            schema = [_schema_element(r) for _ in range(size)]
        elif fid == 3 and kind == _I64:
            num_rows = r.zigzag()
        elif fid == 4 and kind == _LIST:
            row_groups, elem = r.list_header()
            for _ in range(row_groups):
                r.skip(elem)
        else:
            r.skip(kind)
    return schema, num_rows, row_groups


def _top_level_columns(schema: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The root's direct children (schema[0] is the root; a group's children follow it depth first)."""
    if not schema or not 0 <= schema[0]["children"] <= len(schema):
        raise _invalid("the footer has no schema; write the file again")
    columns, i = [], 1
    for _ in range(schema[0]["children"]):
        if i >= len(schema):
            raise _invalid("the footer's schema is cut short; write the file again")
        columns.append(schema[i])
        pending = schema[i]["children"]
        i += 1
        while pending > 0:  # skip the subtree of a group column
            if i >= len(schema):
                raise _invalid("the footer's schema is cut short; write the file again")
            pending += schema[i]["children"] - 1
            i += 1
    return columns


def _read_footer(path: Path, size: int) -> bytes:
    if size < 12:
        raise truncated("parquet", size=size)
    with open(path, "rb") as f:
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] == b"PARE":
            raise ScreeningError(415, "unsupported_format", "parquet with an encrypted footer is not accepted; write "
                                 "it without encryption", {})
        if tail[4:] != MAGIC:
            raise truncated("parquet: no PAR1 at the end", size=size)
        (n,) = struct.unpack("<I", tail[:4])
        if n == 0 or n > size - 12:
            raise truncated(f"parquet: footer length {n} does not fit a {size}-byte file", size=size)
        if n > MAX_FOOTER_BYTES:
            raise ScreeningError(413, "entry_too_large", f"parquet: the footer is {n} bytes, more than "
                                 f"{MAX_FOOTER_BYTES}; write the file with fewer row groups", {"footer_bytes": n})
        f.seek(size - 8 - n)
        return f.read(n)


def screen_parquet(path: Path, size: int) -> Sniffed:
    """A parquet file holding a top-level string column "text" and at least one row."""
    schema, num_rows, row_groups = _file_metadata(_read_footer(path, size))
    columns = _top_level_columns(schema)
    names = [c["name"] for c in columns]
    text = next((c for c in columns if c["name"] == "text"), None)
    if text is None:
        raise _invalid(f"no top-level column \"text\" (columns: {', '.join(map(str, names[:10]))}); name the column "
                       "holding the documents \"text\" (e.g. table.rename_columns) and write the file again",
                       {"columns": names[:MAX_DETAIL_ITEMS]})
    if text["children"] or text["type"] != _BYTE_ARRAY:
        kind = "a group" if text["children"] else (_PHYSICAL[text["type"]] if text["type"] in range(8) else "unknown")
        raise _invalid(f"column \"text\" is {kind}, not a string column; store the documents as strings",
                       {"column": "text"})
    if not num_rows:
        raise empty_text("the parquet file", "no rows")
    return Sniffed("parquet", {"bytes": size, "rows": num_rows, "row_groups": row_groups, "text_column": "text",
                               "columns": names[:MAX_DETAIL_ITEMS], "note": TOKENIZED_NOTE})
