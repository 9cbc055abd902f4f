"""An S3-compatible server for tests: moto's server mode in its own process on a free port.

A process rather than moto's in-process ThreadedMotoServer: the server keeps every object in its
memory, which would spoil the tests that bound the client's memory, and the API and several workers
hammering it should not compete with the test runner for one interpreter lock.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from testing.stack import free_port

@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def settings(self, bucket: str, prefix: str = "blobs", **extra: str) -> dict[str, str]:
        """SQUEEZE_* settings that point a process at `s3://bucket/prefix` on this server."""
        return {"SQUEEZE_BLOB_URL": f"s3://{bucket}/{prefix}", "SQUEEZE_S3_ENDPOINT_URL": self.endpoint,
                "SQUEEZE_S3_REGION": "us-east-1", "SQUEEZE_S3_ACCESS_KEY_ID": "testing",
                "SQUEEZE_S3_SECRET_ACCESS_KEY": "testing", **extra}

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                              aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = "squeeze-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_s3_server(log: Path) -> S3Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
            return S3Server(endpoint, proc)
        except httpx.HTTPError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto server did not start; see {log}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3-compatible server for the session; each test takes its own bucket (`s3_server.new_bucket()`)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install '.[test]')")
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()
