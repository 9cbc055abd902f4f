"""Per-job cgroups (worker/cgroups.py, docs/security.md): limits attacked through real processes where the host
delegates cgroups; the discovery of hierarchies as a pure unit on a fake /sys/fs/cgroup, so both hosts with and
hosts without delegation are covered on every host."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from app.core.config import Settings
from tests.worker.test_isolation import FORK_LOOP, limits, pid_gone, run_py
from worker import cgroups, isolation, launch
from worker.isolation_probe import describe
from worker.jobdir import prepare_jobdir

MiB = 1 << 20
HOST = cgroups.hierarchies()
HOST_CONTROLLERS = {c for h in HOST for c in h.controllers}
needs = {c: pytest.mark.skipif(c not in HOST_CONTROLLERS or os.geteuid() != 0,
                               reason=f"the host delegates no {c} cgroup to this root worker") for c in cgroups.CONTROLLERS}


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    prepare_jobdir(d, limits())
    return d


@contextlib.contextmanager
def group(name: str, memory: int = 1 << 30, pids: int = 256, cores: float = 2.0) -> Iterator[cgroups.JobCgroup]:
    job = cgroups.create(f"test-{name}-{os.getpid()}", cgroups.CgroupLimits(memory, pids, cores))
    try:
        yield job
    finally:
        job.close()


# --------------------------------------------------------------------------- discovery (pure unit)


def _fake_v2(tmp_path: Path, offered: str) -> tuple[str, str]:
    own = tmp_path / "unified" / "worker.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(offered)
    (own / "cgroup.subtree_control").write_text("")
    (own / cgroups.GROUP_DIR).mkdir()
    (own / cgroups.GROUP_DIR / "cgroup.subtree_control").write_text("")
    mountinfo = f"30 20 0:26 / {tmp_path}/unified rw,nosuid - cgroup2 cgroup2 rw\n"
    return "0::/worker.service\n", mountinfo


def test_v2_is_found_in_the_workers_own_cgroup_with_the_controllers_it_offers(tmp_path):
    proc_cgroup, mountinfo = _fake_v2(tmp_path, "cpuset cpu io memory hugetlb pids")
    found = cgroups.discover(proc_cgroup, mountinfo)
    assert found == [cgroups.Hierarchy(2, tmp_path / "unified/worker.service" / cgroups.GROUP_DIR,
                                       ("cpu", "memory", "pids"))]


def test_v1_fills_in_what_v2_does_not_offer(tmp_path):
    proc_cgroup, mountinfo = _fake_v2(tmp_path, "hugetlb")
    (tmp_path / "pids" / "a").mkdir(parents=True)
    (tmp_path / "memory").mkdir()
    proc_cgroup += "8:pids:/a\n4:memory:/\n"
    mountinfo += (f"31 20 0:27 / {tmp_path}/pids rw - cgroup cgroup rw,pids\n"
                  f"32 20 0:28 / {tmp_path}/memory rw - cgroup cgroup rw,memory\n")
    found = cgroups.discover(proc_cgroup, mountinfo)
    assert set(found) == {cgroups.Hierarchy(1, tmp_path / "memory" / cgroups.GROUP_DIR, ("memory",)),
                          cgroups.Hierarchy(1, tmp_path / "pids/a" / cgroups.GROUP_DIR, ("pids",))}


def test_limits_a_host_takes_but_does_not_enforce_are_not_used(tmp_path):
    # A directory of plain files takes every write, like a cgroupfs that accounts without enforcing (gVisor):
    # the probes run real processes in it and find no controller held them.
    fake = cgroups.Hierarchy(1, tmp_path / cgroups.GROUP_DIR, cgroups.CONTROLLERS)
    fake.base.mkdir()
    assert cgroups._verified([fake]) == []


def test_no_cgroup_mount_means_no_hierarchy():
    assert cgroups.discover("0::/\n", "22 1 0:21 / /proc rw - proc proc rw\n") == []


# --------------------------------------------------------------------------- what each host applies


def test_describe_says_cgroups_where_the_host_delegates_them_and_rlimits_otherwise():
    info = describe()
    if os.geteuid() == 0 and HOST:
        assert info["resource_control"].startswith("cgroup v") and info["cgroup"]["controllers"], info
        assert ("AS" in info["rlimits"]) == ("memory" not in info["cgroup"]["controllers"])
    else:
        assert info["resource_control"] == "rlimits" and "AS" in info["rlimits"]
        assert any("no cgroup" in m for m in info["missing"]), info["missing"]


# --------------------------------------------------------------------------- limits, attacked


@needs["memory"]
def test_the_memory_cgroup_ends_a_job_over_its_limit_and_counts_it(jobdir):
    with group("memory", memory=200 * MiB) as job:
        proc, out, err = run_py("""
            block = bytearray(400 << 20)   # touched: 400 MiB resident > 200 MiB
            print("allocated", flush=True)
            """, jobdir, limits(memory_bytes=200 * MiB), cgroup=job)
        assert "allocated" not in out and proc.returncode != 0, (out, err)
        assert "AS" not in proc.isolation["rlimits"]  # the cgroup, not the address space, stopped it
        assert job.oom_kills() >= 1
        assert job.peak_memory_bytes() <= 200 * MiB + MiB


@needs["pids"]
def test_the_pids_cgroup_caps_processes_whatever_rlimit_nproc_allows(jobdir):
    with group("pids", pids=20) as job:
        proc, out, err = run_py(FORK_LOOP + "\nprint('forked', n)\n", jobdir, limits(max_processes=1000), cgroup=job)
    assert int(out.rsplit("forked ", 1)[1].split()[0]) < 20, out
    assert proc.isolation["rlimits"].get("NPROC", 1000) == 1000


@needs["cpu"]
def test_the_cpu_cgroup_throttles_a_busy_job_to_its_quota(jobdir):
    with group("cpu", cores=0.1) as job:
        proc, out, err = run_py("""
            import time
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                pass
            """, jobdir, cgroup=job)
        assert proc.returncode == 0, err
        cpu_dir = next(path for h, path in job.dirs if "cpu" in h.controllers)
        assert cgroups._stat_field(cpu_dir / "cpu.stat", "nr_throttled") > 0


@pytest.mark.skipif(not HOST or os.geteuid() != 0, reason="the host delegates no cgroup to this root worker")
def test_closing_the_cgroup_kills_what_escaped_the_process_group(jobdir, monkeypatch):
    # Weak mode has no PID namespace: a setsid daemon leaves the process group; only the cgroup still holds it.
    monkeypatch.setattr(isolation, "bwrap_path", lambda: None)
    with group("kill") as job:
        proc, out, err = run_py("""
            import os, sys
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    null = os.open(os.devnull, os.O_RDWR)
                    for fd in (0, 1, 2):  # let go of the pipes the test reads to their end
                        os.dup2(null, fd)
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)"])
                os._exit(0)
            os.wait()
            """, jobdir, limits(allow_weak=True), cgroup=job)
        assert proc.returncode == 0, err
        left = job.members()
        assert left, "the daemon should still run in the cgroup"
        dirs = [path for _, path in job.dirs]
        assert sorted(job.close()) == left
        assert all(pid_gone(pid) for pid in left) and not any(path.exists() for path in dirs)


@pytest.mark.skipif(not HOST or os.geteuid() != 0, reason="the host delegates no cgroup to this root worker")
def test_a_started_sandbox_has_its_cgroup_takes_a_new_memory_limit_and_leaves_nothing(tmp_path):
    settings = Settings(data_dir=tmp_path, sandbox_uid_first=201_100, sandbox_uid_count=4,
                        sandbox_slot_dir=tmp_path / "slots")
    sandbox = launch.start(settings, "cgroup-test", settings.sandbox_memory_bytes)
    try:
        assert sandbox.cgroup is not None and sandbox.cgroup.name == f"uid-{sandbox.uid}"
        assert sandbox.describe()["cgroup"]["name"] == sandbox.cgroup.name
        assert sandbox.proc.pid in sandbox.cgroup.members()
        if "memory" in HOST_CONTROLLERS:
            assert sandbox.fit_memory(3 << 30) and sandbox.limits.memory_bytes == 3 << 30
            memory_dir = next(p for h, p in sandbox.cgroup.dirs if "memory" in h.controllers)
            limit_file = "memory.max" if memory_dir.joinpath("memory.max").exists() else "memory.limit_in_bytes"
            assert int(memory_dir.joinpath(limit_file).read_text()) == 3 << 30
        dirs = [path for _, path in sandbox.cgroup.dirs]
    finally:
        sandbox.close("cgroup-test")
    assert not any(path.exists() for path in dirs)


def test_cgroups_off_gives_no_cgroup(tmp_path):
    settings = Settings(data_dir=tmp_path, sandbox_cgroups=False, sandbox_uid_first=201_110, sandbox_uid_count=4,
                        sandbox_slot_dir=tmp_path / "slots")
    sandbox = launch.start(settings, "no-cgroup", settings.sandbox_memory_bytes)
    try:
        assert sandbox.cgroup is None and sandbox.describe()["resource_control"] == "rlimits"
    finally:
        sandbox.close("no-cgroup")


def test_the_module_runs_on_the_stdlib_alone():
    code = "import sys; sys.path.insert(0, 'worker'); import cgroups; assert 'app' not in sys.modules"
    subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
