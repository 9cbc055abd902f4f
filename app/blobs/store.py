"""Content-addressed blob storage. Blobs are written before rows (docs/reliability.md, Rules)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

from app.core.config import Settings, get_settings

CHUNK = 1024 * 1024


class BlobStore(Protocol):
    """Where models, datasets and artifacts live, addressed by their SHA-256.

    Implementations guarantee: `put_file` is atomic (a reader never sees a partial blob),
    idempotent (the same content twice is one blob), consumes `src` (stored or not) and raises
    StorageFull when no space is left; `size`, `open`, `read_range` and `fetch` of an unknown
    digest raise FileNotFoundError; `fetch` writes the blob
    to a local path with no shared disk assumed (the worker's way in). `local_path` is the file
    itself where the store has one (None otherwise), `presigned_url` a URL a client may download
    from directly (None when the store does not hand those out).
    """

    def put_file(self, src: Path, sha256: str) -> None: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]: ...
    def fetch(self, sha256: str, dest: Path) -> None: ...
    def local_path(self, sha256: str) -> Path | None: ...
    def presigned_url(self, sha256: str, filename: str) -> str | None: ...
    def delete(self, sha256: str) -> None: ...


# A full disk, or a full quota: the same answer for the user (507 at upload, `storage_full` for a job).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(OSError):
    """No space left where a blob or an upload's temp file is written. Raised instead of the bare ENOSPC so the API
    (app/core/errors.py) and the worker (worker/supervisor.py) can name it; nothing partial is left behind."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _check_digest(sha256: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise FileNotFoundError(sha256)
    return sha256


def secure_data_dir(settings) -> None:
    """The server's files are its own (docs/security.md): files it creates from now on are 0600 and folders 0700
    (umask 077), the data dir is 0700, and an SQLite database (with its -wal and -shm files) 0600."""
    os.umask(0o077)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    if settings.database_url.startswith("sqlite:///"):
        db = Path(settings.database_url.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                os.chmod(path, 0o600)


class LocalStore:
    """Blobs as files under a folder: `ab/cdef....` by digest."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / _check_digest(sha256)[:2] / sha256

    def put_file(self, src: Path, sha256: str) -> None:
        dest = self._path(sha256)
        try:
            if dest.exists():
                return
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Readable by the service user only (docs/security.md): the API and workers that share a local
            # store run as one user.
            os.chmod(src, 0o600)
            try:
                os.replace(src, dest)  # same filesystem: atomic
            except OSError:
                self._copy_in(src, dest)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise StorageFull(f"no space left in the blob store ({self.root}) for {sha256}") from exc
            raise
        finally:
            src.unlink(missing_ok=True)  # consumed, stored or not: a failed put leaves no temp file behind

    @staticmethod
    def _copy_in(src: Path, dest: Path) -> None:
        """Another filesystem: copy to a temp name beside the destination, then rename. A copy cut short (a full
        disk) removes its temp file: the store never keeps a partial blob, under any name."""
        tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".put-", delete=False)
        try:
            with tmp, open(src, "rb") as f:
                shutil.copyfileobj(f, tmp, CHUNK)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.chmod(tmp.name, 0o600)
            os.replace(tmp.name, dest)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise

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

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes start..end inclusive, in chunks."""
        with self.open(sha256) as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def fetch(self, sha256: str, dest: Path) -> None:
        shutil.copyfile(self.path(sha256), dest)

    def local_path(self, sha256: str) -> Path | None:
        return self.path(sha256)

    def presigned_url(self, sha256: str, filename: str) -> str | None:
        return None

    def delete(self, sha256: str) -> None:
        try:
            self._path(sha256).unlink(missing_ok=True)
        except FileNotFoundError:
            pass


class S3Store:
    """Blobs as objects in an S3-compatible bucket: `prefix/ab/abcdef...` by digest.

    Uploads go through boto3's managed transfer (multipart past one part, a bounded number of
    parts in flight, so memory stays near `max_concurrency x chunk` whatever the file size); S3
    makes an object visible only once complete, which gives the atomicity the protocol asks for.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, chunk_bytes: int = 8 * 1024 * 1024,
                 max_concurrency: int = 4, presigned_downloads: bool = False, presign_ttl_s: int = 3600):
        from boto3.s3.transfer import TransferConfig

        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.presigned_downloads, self.presign_ttl_s = presigned_downloads, presign_ttl_s
        self.transfer = TransferConfig(multipart_threshold=chunk_bytes, multipart_chunksize=chunk_bytes,
                                       max_concurrency=max_concurrency, io_chunksize=256 * 1024)

    def key(self, sha256: str) -> str:
        rel = f"{_check_digest(sha256)[:2]}/{sha256}"
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def _head(self, sha256: str) -> dict:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(sha256) from None
            raise

    def ensure_bucket(self) -> None:
        """Creates the bucket when it is missing (run by `squeeze migrate`)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def put_file(self, src: Path, sha256: str) -> None:
        try:
            if not self.exists(sha256):
                if (self.client, self.bucket) not in _buckets_ready:  # a fresh MinIO has no bucket yet
                    self.ensure_bucket()
                    _buckets_ready.add((self.client, self.bucket))
                self.client.upload_file(str(src), self.bucket, self.key(sha256), Config=self.transfer)
        finally:
            Path(src).unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        try:
            self._head(sha256)
            return True
        except FileNotFoundError:
            return False

    def size(self, sha256: str) -> int:
        return int(self._head(sha256)["ContentLength"])

    def _get(self, sha256: str, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(sha256), **kwargs)["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(sha256) from None
            raise

    def open(self, sha256: str) -> BinaryIO:
        return self._get(sha256)

    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes start..end inclusive, streamed from one ranged GET."""
        body = self._get(sha256, Range=f"bytes={start}-{end}")
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def fetch(self, sha256: str, dest: Path) -> None:
        """Downloads to a temp name beside `dest`, checks the digest, then renames: a partial or corrupt
        download never sits at `dest`."""
        from botocore.exceptions import ClientError

        dest = Path(dest)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
        os.close(fd)
        try:
            try:
                self.client.download_file(self.bucket, self.key(sha256), tmp, Config=self.transfer)
            except ClientError as exc:
                if self._missing(exc):
                    raise FileNotFoundError(sha256) from None
                raise
            digest = hashlib.sha256()
            with open(tmp, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    digest.update(chunk)
            if digest.hexdigest() != sha256:
                raise OSError(f"blob {sha256} from the bucket has digest {digest.hexdigest()}")
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def local_path(self, sha256: str) -> Path | None:
        return None

    def presigned_url(self, sha256: str, filename: str) -> str | None:
        if not self.presigned_downloads:
            return None
        self._head(sha256)  # a missing blob is a 404 here, not a dead link for the client
        safe = "".join(c for c in filename if c.isalnum() or c in "._-") or "download"
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=self.presign_ttl_s,
            Params={"Bucket": self.bucket, "Key": self.key(sha256),
                    "ResponseContentDisposition": f'attachment; filename="{safe}"'})

    def delete(self, sha256: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        except FileNotFoundError:
            pass


_clients: dict[tuple, Any] = {}
_buckets_ready: set[tuple[Any, str]] = set()
_clients_lock = threading.Lock()


def _s3_client(settings: Settings) -> Any:
    """One client per process and configuration: creating one costs tens of ms, and clients are thread-safe."""
    key = (settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id, settings.s3_secret_access_key)
    with _clients_lock:  # boto3 sessions are not thread-safe
        if key not in _clients:
            import boto3
            from botocore.config import Config

            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region or None,
                aws_access_key_id=settings.s3_access_key_id or None,
                aws_secret_access_key=settings.s3_secret_access_key or None,
                config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                              max_pool_connections=32))
        return _clients[key]


def make_store(settings: Settings | None = None) -> BlobStore:
    settings = settings or get_settings()
    url = urlparse(settings.blob_url)
    if url.scheme == "file":
        return LocalStore(Path(url.path))
    if url.scheme == "s3":
        if not url.netloc:
            raise ValueError("SQUEEZE_BLOB_URL s3://bucket/prefix needs a bucket")
        return S3Store(_s3_client(settings), url.netloc, url.path, chunk_bytes=settings.s3_multipart_chunk_bytes,
                       presigned_downloads=settings.s3_presigned_downloads,
                       presign_ttl_s=settings.s3_presign_ttl_s)
    raise ValueError(f"unsupported SQUEEZE_BLOB_URL scheme {url.scheme!r} (supported: file://, s3://)")
