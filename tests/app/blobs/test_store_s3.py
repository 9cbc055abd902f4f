"""S3Store against a real S3-compatible server (moto's server mode, in its own process)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import httpx
import pytest

from app.blobs.store import S3Store, make_store
from app.core.config import Settings
from tests.app.api.routes.test_api import npz_bytes
from tests.conftest import ADMIN_KEY
from testing.s3 import s3_server  # noqa: F401  (fixture)
from testing.stack import reset_caches

MiB = 1024 * 1024


@pytest.fixture
def store(s3_server, tmp_path) -> S3Store:  # noqa: F811
    bucket = s3_server.new_bucket()
    env = s3_server.settings(bucket, prefix="team/blobs")
    settings = Settings(data_dir=tmp_path, blob_url=env["SQUEEZE_BLOB_URL"], s3_endpoint_url=s3_server.endpoint,
                        s3_region="us-east-1", s3_access_key_id="testing", s3_secret_access_key="testing",
                        s3_multipart_chunk_bytes=5 * MiB)
    made = make_store(settings)
    assert isinstance(made, S3Store)
    return made


def _blob(tmp_path, data: bytes, name: str = "src") -> tuple[os.PathLike, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_put_get_exists_range_fetch_delete(store, tmp_path):
    data = bytes(range(256)) * 40
    src, sha = _blob(tmp_path, data)
    assert not store.exists(sha)
    store.put_file(src, sha)
    assert not src.exists()  # consumed, like LocalStore
    assert store.key(sha) == f"team/blobs/{sha[:2]}/{sha}"
    assert store.client.head_object(Bucket=store.bucket, Key=store.key(sha))["ContentLength"] == len(data)
    assert store.exists(sha) and store.size(sha) == len(data)
    assert store.open(sha).read() == data
    assert b"".join(store.read_range(sha, 10, 99)) == data[10:100]
    assert b"".join(store.read_range(sha, len(data) - 1, len(data) - 1)) == data[-1:]
    dest = tmp_path / "fetched"
    store.fetch(sha, dest)
    assert dest.read_bytes() == data
    assert store.local_path(sha) is None and store.presigned_url(sha, "x") is None
    store.delete(sha)
    assert not store.exists(sha)
    store.delete(sha)  # deleting twice is fine


def test_put_is_idempotent(store, tmp_path):
    src, sha = _blob(tmp_path, b"same content")
    store.put_file(src, sha)
    first = store.client.head_object(Bucket=store.bucket, Key=store.key(sha))["LastModified"]
    again, _ = _blob(tmp_path, b"same content", "again")
    store.put_file(again, sha)
    assert not again.exists()
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert keys == [store.key(sha)]
    assert store.client.head_object(Bucket=store.bucket, Key=store.key(sha))["LastModified"] == first


def test_unknown_digest_is_file_not_found(store, tmp_path):
    sha = "0" * 64
    assert not store.exists(sha) and not store.exists("../etc/passwd")
    for call in (lambda: store.size(sha), lambda: store.open(sha), lambda: store.fetch(sha, tmp_path / "x"),
                 lambda: store.size("not-a-digest")):
        with pytest.raises(FileNotFoundError):
            call()
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_fetch_refuses_a_blob_whose_content_does_not_match(store, tmp_path):
    sha = hashlib.sha256(b"expected").hexdigest()
    store.client.put_object(Bucket=store.bucket, Key=store.key(sha), Body=b"tampered")
    with pytest.raises(OSError, match="digest"):
        store.fetch(sha, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_large_file_goes_multipart_with_bounded_memory(store, tmp_path):
    size = 48 * MiB
    src = tmp_path / "big"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
    sha = digest.hexdigest()
    tracemalloc.start()
    try:
        store.put_file(src, sha)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 5 MiB parts, 4 in flight: the whole 48 MiB file is never held at once.
    assert peak < 32 * MiB, f"peak {peak / MiB:.1f} MiB"
    etag = store.client.head_object(Bucket=store.bucket, Key=store.key(sha))["ETag"]
    assert etag.strip('"').endswith("-10"), etag  # 48 MiB in 5 MiB parts: a 10-part multipart upload
    dest = tmp_path / "back"
    tracemalloc.start()
    try:
        store.fetch(sha, dest)  # checks the digest too
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert dest.stat().st_size == size


@pytest.fixture
def s3_api(s3_server, configured, monkeypatch):  # noqa: F811
    """The real app on the real database with its blobs in a bucket; yields (client, bucket)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    bucket = s3_server.new_bucket()
    for k, v in s3_server.settings(bucket).items():
        monkeypatch.setenv(k, v)
    reset_caches()
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        yield client, bucket


@pytest.mark.parametrize("backend_name", ["sqlite"])
def test_download_through_the_api_streams_from_the_bucket(s3_api, s3_server, monkeypatch):  # noqa: F811
    api, bucket = s3_api
    data = npz_bytes(x=__import__("numpy").arange(4096, dtype="float32").reshape(64, 64))
    ds = api.post("/v1/datasets", params={"name": "d.npz"}, content=data)
    assert ds.status_code == 201, ds.text
    sha = ds.json()["sha256"]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"blobs/{sha[:2]}/{sha}"]
    url = f"/v1/datasets/{ds.json()['id']}/file"
    full = api.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{sha}"' and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-length"] == str(len(data)) and "d.npz" in full.headers["content-disposition"]
    assert api.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    part = api.get(url, headers={"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == data[2:10]
    assert part.headers["content-range"] == f"bytes 2-9/{len(data)}"
    tail = api.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == data[-5:]
    assert api.get(url, headers={"Range": f"bytes={len(data) + 10}-"}).status_code == 416
    stale = api.get(url, headers={"Range": "bytes=0-3", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data  # the client's copy is stale: the whole file

    monkeypatch.setenv("SQUEEZE_S3_PRESIGNED_DOWNLOADS", "true")
    reset_caches()
    redirect = api.get(url, follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_server.endpoint)
    direct = httpx.get(redirect.headers["location"])
    assert direct.status_code == 200 and direct.content == data
    assert "d.npz" in direct.headers.get("content-disposition", "")

    s3_server.client().delete_object(Bucket=bucket, Key=keys[0])
    monkeypatch.setenv("SQUEEZE_S3_PRESIGNED_DOWNLOADS", "false")
    reset_caches()
    gone = api.get(url)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "blob_missing"
