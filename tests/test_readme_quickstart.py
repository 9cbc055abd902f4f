"""The README's quick start, run as written: its fenced block (the one after the `quickstart` marker) is taken
from README.md, so a change to the README changes what runs. It runs in a clean directory holding only what a
checkout gives it (examples/ and the .venv `make run` made) against a live API server and worker; only the
server's URL is swapped for the test server's."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess

import httpx

from testing.stack import ROOT
from tests.test_e2e import FAST_REAPER

MARKER = "<!-- quickstart:"
README_URL = "http://127.0.0.1:8000"


def quickstart_block(readme: str) -> str:
    """The first ```sh block after the marker line."""
    after = readme[readme.index(MARKER):]
    found = re.search(r"```sh\n(.*?)```", after, re.S)
    assert found, "no ```sh block after the quickstart marker"
    return found.group(1)


def test_quickstart_block_is_found_and_names_the_readme_url():
    block = quickstart_block((ROOT / "README.md").read_text())
    assert README_URL in block and "squeeze compress" in block


def clean_checkout(folder):
    folder.mkdir()
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / ".venv").symlink_to(ROOT / ".venv")  # what `make run` leaves in a checkout
    return folder


def test_readme_quickstart_runs_against_a_live_server(stack_factory, tmp_path):
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    here = clean_checkout(tmp_path / "checkout")
    script = quickstart_block((ROOT / "README.md").read_text()).replace(README_URL, stack.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUEEZE_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "no-config"), SQUEEZE_DATA_DIR=stack.env["SQUEEZE_DATA_DIR"],
               SQUEEZE_DATABASE_URL=stack.env["SQUEEZE_DATABASE_URL"])  # the server host's settings, for `keys`

    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script + '\necho "key=$SQUEEZE_API_KEY"'],
                          cwd=here, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout + done.stderr
    key = re.search(r"^key=(sqz_\S+)$", done.stdout, re.M).group(1)
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
        jobs = api.get("/v1/jobs").json()["data"]
    assert [j["status"] for j in jobs] == ["succeeded"]
    assert jobs[0]["id"] in done.stdout  # `squeeze jobs list` showed it
    shipped = {a["name"]: a["sha256"] for a in jobs[0]["artifacts"]}
    for name in ("model.pt2", "model.safetensors", "report.json", "report.png"):
        assert hashlib.sha256((here / "out" / name).read_bytes()).hexdigest() == shipped[name], name
    # the first example looks like success: a smaller file (the compact safetensors), said so
    metrics = jobs[0]["metrics"]
    assert metrics["ratios"]["size"] > 1.5 and metrics["size_ratio_output"] == "safetensors", metrics["ratios"]
    assert "no_size_reduction" not in metrics["flags"]
