"""HTTP plumbing of the client: streamed uploads and checked downloads, server-sent events, small helpers."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from squeeze_client.errors import SqueezeError, raise_for

CHUNK = 1024 * 1024


def file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in file_chunks(f):
            digest.update(chunk)
    return digest.hexdigest()


def params(**values: Any) -> dict[str, Any]:
    """The query or body fields that have a value."""
    return {k: v for k, v in values.items() if v is not None}


def stream_size(source: IO[bytes]) -> int | None:
    """Bytes left to read from a file object, when it is a real file."""
    try:
        return os.fstat(source.fileno()).st_size - source.tell()
    except (AttributeError, OSError, ValueError):
        return None


def filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "filename" and value:
            return Path(value.strip('"')).name or None
    return None


def save_checked(response: httpx.Response, path: str, dest: Path, default_name: str | None) -> Path:
    """Writes a streamed answer into `dest` (a file, or a folder to put `default_name` in), checking the SHA-256
    the server sent as ETag; the file appears only once complete."""
    raise_for(response)
    if dest.is_dir():
        dest = dest / (default_name or filename(response) or Path(path).name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in response.iter_bytes(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        etag = response.headers.get("etag", "").strip('"')
        if etag and len(etag) == 64 and etag != digest.hexdigest():
            raise SqueezeError(response.status_code, "checksum_mismatch",
                               f"{path}: downloaded bytes do not match the server's sha256 {etag}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each server-sent event; comments and fields other than event/data are skipped."""
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
    if data:
        yield kind, "\n".join(data)
