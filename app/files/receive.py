"""Streams a request body (raw or multipart field `file`) to a temp file while hashing it.

Memory stays flat whatever the size (bench/RESULTS.md, measured facts: request.stream() beats UploadFile's spooling).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.blobs.store import FULL_ERRNOS, StorageFull
from app.core.errors import APIError

# Multipart framing around the file: a declared length this much over a limit may still fit it.
FRAMING_SLACK = 64 * 1024


@contextmanager
def _disk_full_is_storage_full(tmp_dir: Path) -> Iterator[None]:
    """ENOSPC while writing the temp file is the server's storage being full (507), not an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL_ERRNOS and not isinstance(exc, StorageFull):
            raise StorageFull(f"no space left in {tmp_dir} to receive an upload") from exc
        raise


@dataclass
class Received:
    path: Path
    sha256: str
    size: int
    filename: str | None


class _Sink:
    """Hashes and writes the body in a thread, 4 MiB at a time, while the event loop receives the next
    batch: receiving, hashing and writing overlap (hashlib and file writes release the GIL)."""

    BATCH = 4 * 1024 * 1024

    def __init__(self, tmp_dir: Path, limit: int):
        self.tmp_dir = tmp_dir
        with _disk_full_is_storage_full(tmp_dir):
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self.file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.hash = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.buffer = bytearray()
        self.pending: asyncio.Future | None = None

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise APIError(413, "too_large", f"upload exceeds the limit of {self.limit} bytes",
                           {"limit_bytes": self.limit})
        self.buffer += data

    def _consume(self, batch: bytearray) -> None:
        self.hash.update(batch)
        with _disk_full_is_storage_full(self.tmp_dir):
            self.file.write(batch)

    async def flush(self, force: bool = False) -> None:
        if len(self.buffer) < self.BATCH and not force:
            return
        if self.pending is not None:
            await self.pending
        batch, self.buffer = self.buffer, bytearray()
        self.pending = asyncio.get_running_loop().run_in_executor(None, self._consume, batch)
        if force:
            await self.pending
            self.pending = None

    async def finish(self) -> None:
        await self.flush(force=True)
        with _disk_full_is_storage_full(self.tmp_dir):
            self.file.close()  # writes what is still buffered: may find the disk full too

    async def discard(self) -> None:
        try:
            if self.pending is not None:
                try:
                    await self.pending
                except Exception:
                    pass
            try:
                self.file.close()
            except OSError:  # the buffered tail hit the same full disk: the file goes anyway
                pass
        finally:
            self.path.unlink(missing_ok=True)


async def receive(request: Request, tmp_dir: Path, limit: int) -> Received:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FRAMING_SLACK:
        raise APIError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {limit} bytes",
                       {"limit_bytes": limit})
    with _disk_full_is_storage_full(tmp_dir):
        tmp_dir.mkdir(parents=True, exist_ok=True)
    if declared and declared.isdigit() and int(declared) > shutil.disk_usage(tmp_dir).free + FRAMING_SLACK:
        # Refused before a byte is read, like the 413: the client is not left sending a body that cannot fit.
        raise StorageFull(f"upload of {declared} bytes does not fit in the free space of {tmp_dir}")
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    sink = _Sink(tmp_dir, limit)
    filename: str | None = None
    try:
        if content_type == b"multipart/form-data":
            boundary = params.get(b"boundary")
            if not boundary:
                raise APIError(400, "bad_request", "multipart body without a boundary")
            state = {"headers": {}, "field": None, "header_name": b"", "found": False}

            def on_part_begin() -> None:
                state["headers"], state["field"] = {}, None

            def on_header_field(data: bytes, start: int, end: int) -> None:
                state["header_name"] += data[start:end]

            def on_header_value(data: bytes, start: int, end: int) -> None:
                name = state["header_name"].lower()
                state["headers"][name] = state["headers"].get(name, b"") + data[start:end]

            def on_header_end() -> None:
                state["header_name"] = b""

            def on_headers_finished() -> None:
                _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
                state["field"] = disp.get(b"name")
                if state["field"] == b"file":
                    nonlocal filename
                    state["found"] = True
                    raw = disp.get(b"filename")
                    filename = raw.decode("utf-8", "replace") if raw else None

            def on_part_data(data: bytes, start: int, end: int) -> None:
                if state["field"] == b"file":
                    sink.append(data[start:end])

            parser = MultipartParser(boundary, {
                "on_part_begin": on_part_begin, "on_header_field": on_header_field,
                "on_header_value": on_header_value, "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
            })
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                    await sink.flush()
                parser.finalize()
            except ParseError as exc:  # a malformed part header was a 500 (found by schemathesis)
                raise APIError(400, "bad_request", f"malformed multipart body: {exc}") from None
            if not state["found"]:
                raise APIError(400, "bad_request", "multipart body has no field named 'file'")
        else:
            async for chunk in request.stream():
                sink.append(chunk)
                await sink.flush()
        if sink.size == 0:
            raise APIError(400, "empty_body", "the upload is empty")
        await sink.finish()
        return Received(sink.path, sink.hash.hexdigest(), sink.size, filename)
    except BaseException:
        # A half-received upload leaves nothing behind (docs/reliability.md, Rules).
        await sink.discard()
        raise
