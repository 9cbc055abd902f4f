"""`squeeze keys` from the shell, against the real database, then used over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.stack import ROOT


def _squeeze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ.copy(), timeout=60)


def test_keys_create_list_revoke(api):
    created = _squeeze("keys", "create", "--team", "shell-team", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sqz_")
    headers = {"Authorization": f"Bearer {key}"}
    assert api.get("/v1/models", headers=headers).status_code == 200
    key_id = next(k["id"] for k in api.get("/v1/keys").json() if k["team"] == "shell-team")
    listed = _squeeze("keys", "list")
    assert key_id in listed.stdout and key not in listed.stdout
    assert _squeeze("keys", "revoke", key_id).returncode == 0
    assert _squeeze("keys", "revoke", "key_missing").returncode == 1
    from app import auth

    auth._cache.clear()  # another process revoked it: this process would see it within the cache TTL
    assert api.get("/v1/models", headers=headers).status_code == 401
