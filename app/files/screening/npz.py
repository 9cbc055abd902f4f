"""Datasets: a .npz of numeric arrays (each .npy header parsed as a literal, never unpickled) or a .safetensors; text
for language models (text.py, parquet.py) is the fallback once every binary format was ruled out."""

from __future__ import annotations

import ast
import math
import re
import struct
from pathlib import Path
from typing import IO, Any

from app.files.screening.common import (
    ACCEPTED_DATASETS,
    MAX_DETAIL_ITEMS,
    ScreeningError,
    Sniffed,
    is_zip,
    looks_like_safetensors,
    read_head,
    truncated,
    unsupported,
)
from app.files.screening.parquet import looks_like_parquet, screen_parquet
from app.files.screening.pickles import looks_like_pickle
from app.files.screening.safetensors_header import check_safetensors
from app.files.screening.text import SAMPLE_BYTES, screen_text
from app.files.screening.zips import check_zip, open_zip

MAX_NPY_HEADER = 10_000  # numpy's own default limit (max_header_size)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"^[<>|=]?(b1|\?|[iu][1248]|f[248]|c(8|16)|[SUV]\d+|[mM]8(\[\w+\])?)$")


def _descr_has_object(descr: Any) -> bool:
    if isinstance(descr, str):
        return "O" in descr
    if isinstance(descr, (list, tuple)):
        return any(_descr_has_object(x) for x in descr)
    return True  # anything else is not a numpy descr: treat as unsafe


def _npy_header(f: IO[bytes], entry: str) -> tuple[dict[str, Any], int]:
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
        raise ScreeningError(422, "invalid_npz", f"{entry}: not a .npy array", {"entry": entry})
    major = magic[6]
    if major == 1:
        raw = f.read(2)
        hlen = struct.unpack("<H", raw)[0] if len(raw) == 2 else -1
        pre = 10
    elif major in (2, 3):
        raw = f.read(4)
        hlen = struct.unpack("<I", raw)[0] if len(raw) == 4 else -1
        pre = 12
    else:
        raise ScreeningError(422, "invalid_npz", f"{entry}: unknown .npy version {major}", {"entry": entry})
    if hlen < 0:
        raise truncated(entry)
    if hlen > MAX_NPY_HEADER:
        raise ScreeningError(422, "invalid_npz", f"{entry}: .npy header too large", {"entry": entry})
    text = f.read(hlen)
    if len(text) < hlen:
        raise truncated(entry)
    try:
        header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
        raise ScreeningError(422, "invalid_npz", f"{entry}: .npy header is not a literal dict", {"entry": entry}) from None
    if not (isinstance(header, dict) and {"descr", "fortran_order", "shape"} <= header.keys()
            and isinstance(header["shape"], tuple)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in header["shape"])):
        raise ScreeningError(422, "invalid_npz", f"{entry}: .npy header lacks descr/fortran_order/shape", {"entry": entry})
    return header, pre + hlen


def _itemsize(descr: str) -> int:
    code = descr.lstrip("<>|=")
    if code in ("?", "b1"):
        return 1
    digits = re.search(r"\d+", code)
    size = int(digits.group()) if digits else 1
    return size * 4 if code[0] == "U" else size


def _screen_npz(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    zf = open_zip(path, "npz")
    with zf:
        base = check_zip(zf, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries, label="npz")
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if not infos:
            raise unsupported(ACCEPTED_DATASETS, "empty zip")
        arrays: dict[str, Any] = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise unsupported(ACCEPTED_DATASETS, f"entry {info.filename!r} is not a .npy array",
                                   entry=info.filename)
            with zf.open(info) as f:
                header, offset = _npy_header(f, info.filename)
            descr = header["descr"]
            if _descr_has_object(descr):
                raise ScreeningError(415, "unsafe_pickle",
                                     f"{info.filename}: object arrays are pickles and are refused; save numeric "
                                     "arrays (numpy.savez with numeric dtypes)", {"entry": info.filename,
                                                                                  "dtype": str(descr)})
            if not (isinstance(descr, str) and _NPY_DESCR.match(descr)):
                raise unsupported(ACCEPTED_DATASETS, f"{info.filename}: dtype {descr!r} is not a plain numeric dtype",
                                   entry=info.filename)
            expected = offset + math.prod(header["shape"]) * _itemsize(descr)
            if info.file_size != expected:
                raise truncated(info.filename, expected_bytes=expected, size=info.file_size)
            key = info.filename[:-4]
            if len(arrays) < MAX_DETAIL_ITEMS:
                arrays[key] = {"shape": list(header["shape"]), "dtype": descr}
        return Sniffed("npz", {**base, "array_count": len(infos), "arrays": arrays})


def sniff_dataset(path: Path, *, max_unpacked_bytes: int, max_entries: int) -> Sniffed:
    """Recognises and screens an uploaded dataset (.npz, .safetensors, .parquet, JSON Lines or UTF-8 text, sniffed
    by content in that order); raises ScreeningError when refused."""
    path = Path(path)
    head, size = read_head(path, ACCEPTED_DATASETS, SAMPLE_BYTES)
    if is_zip(head):
        return _screen_npz(path, max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries)
    if looks_like_pickle(head):
        raise ScreeningError(415, "unsafe_pickle", f"pickled datasets are refused: they execute code when loaded; "
                             f"upload {ACCEPTED_DATASETS}", {"accepted": ACCEPTED_DATASETS})
    if head.startswith(_NPY_MAGIC):
        raise unsupported(ACCEPTED_DATASETS, "a single .npy is not accepted: wrap it with numpy.savez(path, x=array)")
    if looks_like_safetensors(head, size):
        with open(path, "rb") as f:
            return Sniffed("safetensors", check_safetensors(f, size, "safetensors"))
    if looks_like_parquet(head):
        return screen_parquet(path, size)
    return screen_text(path, head, size)
