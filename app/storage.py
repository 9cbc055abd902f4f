"""Content-addressed blob storage. Blobs are written before rows (DESIGN.md §6)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from app.config import Settings, get_settings

CHUNK = 1024 * 1024


class BlobStore(Protocol):
    """Where models, datasets and artifacts live, addressed by their SHA-256.

    Implementations guarantee: `put_file` is atomic (a reader never sees a partial blob) and
    idempotent (the same content twice is one blob); `path`/`open` of an unknown digest raise
    FileNotFoundError.
    """

    def put_file(self, src: Path, sha256: str) -> None: ...
    def exists(self, sha256: str) -> bool: ...
    def path(self, sha256: str) -> Path: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def delete(self, sha256: str) -> None: ...


class LocalStore:
    """Blobs as files under a folder: `ab/cdef....` by digest."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise FileNotFoundError(sha256)
        return self.root / sha256[:2] / sha256

    def put_file(self, src: Path, sha256: str) -> None:
        dest = self._path(sha256)
        if dest.exists():
            src.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Temp files are 0600; blobs must be readable by the API and worker users alike.
        os.chmod(src, 0o644)
        try:
            os.replace(src, dest)  # same filesystem: atomic
        except OSError:
            # Another filesystem: copy to a temp name beside the destination, then rename.
            with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, tmp, CHUNK)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, dest)
            src.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        try:
            return self._path(sha256).exists()
        except FileNotFoundError:
            return False

    def path(self, sha256: str) -> Path:
        p = self._path(sha256)
        if not p.exists():
            raise FileNotFoundError(sha256)
        return p

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def delete(self, sha256: str) -> None:
        try:
            self._path(sha256).unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def make_store(settings: Settings | None = None) -> BlobStore:
    settings = settings or get_settings()
    url = urlparse(settings.blob_url)
    if url.scheme == "file":
        return LocalStore(Path(url.path))
    raise ValueError(f"unsupported SQUEEZE_BLOB_URL scheme {url.scheme!r} (supported: file://)")
