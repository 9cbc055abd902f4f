"""The sandbox's memory limit scales with the size of the job's models (worker/memory.py)."""

from __future__ import annotations

import hashlib

from app.blobs.store import LocalStore
from app.core.config import Settings
from app.jobs.lifecycle import Claim
from worker import supervisor
from worker.memory import sandbox_memory

GiB, MiB = 1024**3, 1024**2


def settings(tmp_path, **overrides) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)


def test_defaults_give_a_small_model_the_floor_and_a_2gib_model_overhead_plus_6x(tmp_path):
    s = settings(tmp_path)
    small = sandbox_memory(s, 200 * 1024)
    assert small.limit_bytes == s.sandbox_memory_bytes == 8 * GiB and small.fits
    big = sandbox_memory(s, 2 * GiB)
    assert big.needed_bytes == big.limit_bytes == 2 * GiB + 6 * 2 * GiB and big.fits
    # the largest upload the default settings accept still fits under the default cap
    assert sandbox_memory(s, s.max_upload_bytes).fits


def test_past_the_cap_the_job_does_not_fit_and_the_limit_stays_at_the_cap(tmp_path):
    s = settings(tmp_path, sandbox_memory_max_bytes=16 * GiB)
    budget = sandbox_memory(s, 3 * GiB)  # 2 + 6 x 3 = 20 GiB
    assert budget.needed_bytes == 20 * GiB and not budget.fits and budget.limit_bytes == 16 * GiB
    message = budget.refusal(s)
    assert "SQUEEZE_SANDBOX_MEMORY_MAX_BYTES" in message and "20.00 GiB" in message
    assert sandbox_memory(s, 14 * GiB // 6).fits  # 2 + 14 = 16 GiB: exactly the cap


def test_the_cap_never_goes_below_the_floor(tmp_path):
    s = settings(tmp_path, sandbox_memory_bytes=40 * GiB, sandbox_memory_max_bytes=32 * GiB)
    budget = sandbox_memory(s, 1 * GiB)
    assert budget.limit_bytes == 40 * GiB and budget.fits


def test_factor_and_overhead_are_settings(tmp_path):
    s = settings(tmp_path, sandbox_memory_bytes=1 * GiB, sandbox_memory_overhead_bytes=512 * MiB,
                 sandbox_memory_per_model_byte=2.5)
    assert sandbox_memory(s, 1 * GiB).limit_bytes == 512 * MiB + int(2.5 * GiB)
    assert sandbox_memory(s, 0).limit_bytes == 1 * GiB


def _blob(store: LocalStore, tmp_path, name: str, size: int) -> str:
    src = tmp_path / name
    src.write_bytes(b"\0" * size)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    store.put_file(src, sha)
    return sha


def test_a_job_over_the_cap_fails_with_resource_limit_before_anything_is_staged(tmp_path):
    s = settings(tmp_path, sandbox_memory_bytes=1 * MiB, sandbox_memory_overhead_bytes=0,
                 sandbox_memory_per_model_byte=6, sandbox_memory_max_bytes=8 * MiB)
    store = LocalStore(tmp_path / "blobs")
    model = _blob(store, tmp_path, "model", 1 * MiB)  # needs 6 MiB: fits alone
    teacher = _blob(store, tmp_path, "teacher", 1 * MiB + 1)  # with the teacher: 12 MiB + 6 bytes, past the cap
    claim = Claim(job_id="job_x", lease="l", attempt=1, recipe={"steps": []}, outputs=["pt2"], model_format="pt2",
                  model_sha256=model, teachers={"mdl_t": {"sha256": teacher, "format": "pt2"}})
    jobdir = tmp_path / "jobs" / "job_x-1"
    outcome = supervisor._run(claim, s, store, jobdir)
    assert outcome.status == "failed" and outcome.error_code == "resource_limit", outcome
    assert "SQUEEZE_SANDBOX_MEMORY_MAX_BYTES" in outcome.error_message
    assert not jobdir.exists()  # refused from the blob sizes alone: nothing was copied


def test_a_missing_model_is_input_missing(tmp_path):
    s = settings(tmp_path)
    claim = Claim(job_id="job_y", lease="l", attempt=1, recipe={"steps": []}, outputs=["pt2"], model_format="pt2",
                  model_sha256="0" * 64)
    outcome = supervisor._run(claim, s, LocalStore(tmp_path / "blobs"), tmp_path / "jobs" / "job_y-1")
    assert outcome.status == "failed" and outcome.error_code == "input_missing"
