"""Zip archives: names, types, sizes and ratios checked through the directory; entries streamed, never extracted."""

from __future__ import annotations

import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from app.files.screening.common import CHUNK, ScreeningError, truncated

# Zip bombs by ratio. Deflate packs weights about 1.1:1 and text a few times, while zeros reach ~1000:1. Past
# RATIO_FREE_BYTES unpacked, both each entry and the archive as a whole may inflate at most MAX_RATIO times: a small
# upload can then never make the sandbox, which extracts the archive again on every job, write more than MAX_RATIO
# times its size (64 entries of 8 MiB - 1 of zeros, 1016:1 each, passed when only entries of 8 MiB were checked).
# Under RATIO_FREE_BYTES the ratio is free, so that tiny, very compressible files (config.json, model.py) pass.
RATIO_FREE_BYTES = 1024 * 1024
MAX_RATIO = 200
BOMB_ADVICE = ("if the file is genuine, zip it without compression (zipfile.ZIP_STORED, `zip -0`, or numpy.savez "
               "rather than numpy.savez_compressed)")

_DRIVE = re.compile(r"^[A-Za-z]:")


def _ratio_bomb(label: str, what: str, unpacked: int, packed: int, **details: Any) -> ScreeningError:
    ratio = unpacked // max(packed, 1)
    return ScreeningError(413, "zip_bomb",
                          f"{label}: {what} inflates {ratio} times ({packed} bytes to {unpacked}), more than the limit "
                          f"of {MAX_RATIO}, like a zip bomb; {BOMB_ADVICE}",
                          {**details, "file_size": unpacked, "compress_size": packed, "max_ratio": MAX_RATIO})


def _check_entry(info: zipfile.ZipInfo, label: str) -> None:
    """One entry's name, type and ratio; refused when extracting it could escape or flood the folder."""
    name = info.filename
    parts = name.split("/")
    if ("\\" in name or "\x00" in name or name.startswith("/") or _DRIVE.match(name)
            or any(p == ".." for p in parts)):
        raise ScreeningError(415, "path_traversal", f"{label}: entry name {name!r} points outside the archive",
                             {"entry": name})
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ScreeningError(415, "path_traversal", f"{label}: entry {name!r} is a symbolic link; links are refused",
                             {"entry": name})
    if info.flag_bits & 0x1:
        raise ScreeningError(415, "unsupported_format", f"{label}: entry {name!r} is encrypted", {"entry": name})
    if info.file_size > RATIO_FREE_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise _ratio_bomb(label, f"entry {name!r}", info.file_size, info.compress_size, entry=name)


def _check_crcs(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], label: str) -> None:
    """Streams every entry; zipfile checks the CRC at the end and never inflates past file_size."""
    for info in infos:
        try:
            with zf.open(info) as f:
                while f.read(CHUNK):
                    pass
        except (zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError, ValueError) as exc:
            raise truncated(label, entry=info.filename, reason=str(exc)) from None


def check_zip(zf: zipfile.ZipFile, *, max_unpacked_bytes: int, max_entries: int, label: str,
              crc: bool = True) -> dict[str, Any]:
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise ScreeningError(413, "zip_bomb", f"{label} holds {len(infos)} entries, more than the limit of {max_entries}",
                             {"entries": len(infos), "max_entries": max_entries})
    total = packed = 0
    seen: set[str] = set()
    for info in infos:
        _check_entry(info, label)
        if info.filename in seen:
            raise ScreeningError(415, "path_traversal", f"{label}: entry {info.filename!r} appears twice",
                                 {"entry": info.filename})
        seen.add(info.filename)
        total += info.file_size
        packed += info.compress_size
    if total > max_unpacked_bytes:
        raise ScreeningError(413, "zip_bomb", f"{label} unpacks to {total} bytes, more than the limit of {max_unpacked_bytes}",
                             {"unpacked_bytes": total, "max_unpacked_bytes": max_unpacked_bytes})
    if total > RATIO_FREE_BYTES and total > MAX_RATIO * max(packed, 1):
        raise _ratio_bomb(label, f"the archive ({len(infos)} entries)", total, packed, entries=len(infos))
    if crc:
        _check_crcs(zf, infos, label)
    return {"entries": len(infos), "unpacked_bytes": total}


def open_zip(src: Path | IO[bytes], label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise truncated(label, reason=str(exc)) from None


def read_entry(zf: zipfile.ZipFile, name: str, limit: int, label: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise ScreeningError(413, "entry_too_large", f"{label}: entry {name!r} is larger than {limit} bytes", {"entry": name})
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise truncated(label, entry=name, reason=str(exc)) from None


def head(zf: zipfile.ZipFile, name: str, n: int = 8) -> bytes:
    with zf.open(name) as f:
        return f.read(n)


def root_of(names: list[str]) -> str | None:
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    if len(roots) == 1 and all("/" in n for n in names):
        return roots.pop()
    return None


@contextmanager
def entry_copy(zf: zipfile.ZipFile, entry: str, *, cap: int, tmp_dir: Path) -> Iterator[IO[bytes]]:
    """The entry copied to an unnamed temp file (gone once closed, or when the process dies), to read a zip nested
    in it: through zf.open every backwards seek inflates the entry again from its first byte (a .pt2 whose nested
    zip put 100 pickles in reverse order after 200 MB of padding took 91 s of CPU). `cap` is the unpacked budget
    (max_unpacked_bytes, which the outer archive's declared total, this entry included, already fits)."""
    info = zf.getinfo(entry)
    if info.file_size > cap:
        raise ScreeningError(413, "zip_bomb", f"{entry} unpacks to {info.file_size} bytes, more than the limit of {cap}",
                             {"entry": entry, "unpacked_bytes": info.file_size, "max_unpacked_bytes": cap})
    with tempfile.TemporaryFile(dir=tmp_dir, prefix="screen-") as tmp:
        copied = 0
        try:
            with zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    copied += len(chunk)
                    if copied > min(cap, info.file_size):  # zipfile stops at file_size; this holds if it did not
                        raise ScreeningError(413, "zip_bomb", f"{entry} inflates past its declared size",
                                             {"entry": entry, "file_size": info.file_size})
                    tmp.write(chunk)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, ValueError) as exc:
            raise truncated(entry, reason=str(exc)) from None
        tmp.seek(0)
        yield tmp
