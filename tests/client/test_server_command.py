"""`squeeze server` as a newcomer starts it: what it prints is what they need next (the URL, the port setting, the
admin key, the dashboard and the API reference), and the URLs it prints answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from testing.stack import ROOT, free_port


def _lines_until(proc: subprocess.Popen, marker: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} in the server's output: {lines}")


def _wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_squeeze_server_prints_the_url_port_setting_dashboard_and_docs(tmp_path):
    port = free_port()
    env = {**os.environ, "SQUEEZE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "80"}
    for name in ("SQUEEZE_DATABASE_URL", "SQUEEZE_BROKER_URL", "SQUEEZE_BLOB_URL"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "squeeze_client", "server", "--port", str(port), "--workers", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = _lines_until(proc, "try: curl")
        text = "\n".join(lines)
        url = f"http://127.0.0.1:{port}"
        assert f"Squeeze on {url}" in text and "SQUEEZE_PORT" in text, text
        assert f"dashboard: {url}/dashboard" in text and f"{url}/docs" in text, text
        assert "admin key: sqz_" in text, text
        _wait_up(f"{url}/healthz")
        assert httpx.get(f"{url}/dashboard", timeout=10).status_code == 200
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
