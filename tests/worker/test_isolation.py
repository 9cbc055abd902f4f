"""Real-process attacks on the sandbox (worker/isolation.py, worker/uid_slots.py): bubblewrap, one uid per job,
rlimits. No mocks, except where a test must pretend bwrap is missing. docs/security.md cites these tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from worker import isolation, uid_slots
from worker.isolation import SandboxError, SandboxLimits, spawn
from worker.isolation_probe import describe
from worker.jobdir import open_job_file, prepare_jobdir

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (one uid per job)")
REPO = Path(__file__).resolve().parents[2]
UIDS = (201_000, 201_001)  # clear of the default range, so a running stack's jobs are never touched

LIMITS = SandboxLimits(memory_bytes=2 << 30, cpu_seconds=60, file_bytes=256 << 20, max_processes=64,
                       uid=UIDS[0] if ROOT else None)


def limits(**changes) -> SandboxLimits:
    return SandboxLimits(**{**vars(LIMITS), **changes})


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    prepare_jobdir(d, LIMITS)
    return d


def run_py(code: str, jobdir: Path, lim: SandboxLimits = LIMITS, timeout: float = 120, **kw):
    proc = spawn([sys.executable, "-I", "-c", textwrap.dedent(code)], jobdir, lim, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, out.decode(), err.decode()


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once pid no longer runs (gone, or a zombie waiting for its reaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def host_processes_matching(marker: str) -> list[int]:
    """Live host processes whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmd and state not in ("Z", "X") and int(entry) != os.getpid():
            found.append(int(entry))
    return found


# --------------------------------------------------------------------------- environment


def test_environment_is_empty_and_secret_absent(jobdir: Path, monkeypatch):
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("SQUEEZE_TEST_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("SQUEEZE_DATABASE_URL", f"postgresql://u:{secret}@db/x")
    proc, out, err = run_py(
        """
        import json, os
        env = dict(os.environ)
        env["_raw"] = open("/proc/self/environ", "rb").read().decode("latin-1")
        env["_parent"] = open("/proc/1/environ", "rb").read().decode("latin-1")  # the namespace's init
        print(json.dumps(env))
        """,
        jobdir,
        extra_env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, err
    env = json.loads(out)
    assert secret not in out
    env.pop("_raw"), env.pop("_parent")
    assert set(env) == {"PATH", "HOME", "LANG", "TMPDIR", "USER", "OMP_NUM_THREADS", "PWD"}  # bwrap sets PWD
    assert env["PWD"] == str(jobdir.resolve())
    assert env["HOME"] == str(jobdir.resolve())
    assert env["TMPDIR"].startswith(str(jobdir.resolve()) + "/")
    assert proc.isolation["empty_environment"] is True


# --------------------------------------------------------------------------- filesystem


def test_writes_outside_jobdir_never_reach_the_host(jobdir: Path):
    name = f"squeeze-escape-{uuid.uuid4().hex}"
    targets = {"tmp": f"/tmp/{name}", "var_tmp": f"/var/tmp/{name}", "shm": f"/dev/shm/{name}",
               "parent": str(jobdir.parent / name), "repo": str(REPO / "worker" / name), "etc": f"/etc/{name}",
               "root": f"/{name}", "dev": f"/dev/{name}"}
    proc, out, err = run_py(
        f"""
        import json, os
        res = {{}}
        for key, path in {targets!r}.items():
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                res[key] = "written"
            except OSError as e:
                res[key] = e.strerror
        open("inside.txt", "w").write("hello from the sandbox")
        res["cwd"] = os.getcwd()
        print(json.dumps(res))
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    res = json.loads(out)
    for key, path in targets.items():
        assert not os.path.exists(path), f"{key}: sandbox write reached the host at {path}"
    for key in ("repo", "etc", "root", "dev"):  # not even into the throw-away root (/tmp is a private tmpfs)
        assert res[key] != "written", (key, res)
    assert res["cwd"] == str(jobdir.resolve())
    assert (jobdir / "inside.txt").read_text() == "hello from the sandbox"


WALK = """
import json, os
opened, seen = [], 0
for top, dirs, files in os.walk("/", onerror=lambda e: None):
    if top.startswith(("/proc", "/sys", "/dev", "/usr")):  # /usr: the distribution's files, and most of the time
        dirs[:] = []
        continue
    for name in files:
        path = os.path.join(top, name)
        seen += 1
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError:
            continue
        if {markers!r}[0].encode() in head or {markers!r}[1].encode() in head or name.startswith("squeeze.db"):
            opened.append(path)
print(json.dumps({{"opened": opened, "seen": seen}}))
"""


def test_model_code_finds_no_database_or_blob_of_any_team(tmp_path: Path):
    """A data dir outside /tmp, with 0755 parents and 0644 files (the old defaults): walked from / by model
    code, no database and no blob of any team can be opened, and no other job directory is listed."""
    base = REPO / ".squeeze" / f"test-isolation-{uuid.uuid4().hex}"
    db_marker, blob_marker = "SQLite format 3-" + uuid.uuid4().hex, "blob-of-team-b-" + uuid.uuid4().hex
    try:
        for path, text in ((base / "squeeze.db", db_marker), (base / "blobs" / "ab" / "abcd", blob_marker),
                           (base / "jobs" / "other-1" / "job.json", blob_marker)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o644)
        for d in (base, base / "blobs", base / "jobs"):
            d.chmod(0o755)
        job = base / "jobs" / "mine-1"
        prepare_jobdir(job, LIMITS)
        proc, out, err = run_py(WALK.format(markers=(db_marker, blob_marker)), job, hidden_paths=[base])
        assert proc.returncode == 0, err
        res = json.loads(out)
        assert res["opened"] == [] and res["seen"] > 100, res  # it did walk the (minimal) root
        assert sorted(os.listdir(base / "jobs")) == ["mine-1", "other-1"]
        proc, out, err = run_py("import os; print(sorted(os.listdir('..')))", job)
        assert eval(out) == ["mine-1"]  # no sibling job directory is visible
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- network


def test_no_network_not_even_loopback(jobdir: Path):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        proc, out, err = run_py(
            f"""
            import json, socket
            res = {{}}
            for host in ("127.0.0.1", "1.1.1.1", "10.0.0.1"):
                s = socket.socket()
                s.settimeout(3)
                try:
                    s.connect((host, {port}))
                    res[host] = "connected"
                except OSError as e:
                    res[host] = type(e).__name__ + ": " + str(e)
                finally:
                    s.close()
            print(json.dumps(res))
            """,
            jobdir,
        )
        assert proc.returncode == 0, err
        assert all(v != "connected" for v in json.loads(out).values()), out
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the parent's listener
        assert "net" in proc.isolation["namespaces"]
    finally:
        server.close()


# --------------------------------------------------------------------------- identity and processes


@needs_root
def test_runs_as_its_own_uid_without_capabilities(jobdir: Path):
    proc, out, err = run_py(
        """
        import json, os, subprocess
        status = open("/proc/self/status").read()
        caps = [l for l in status.splitlines() if l.startswith(("CapEff", "CapPrm", "NoNewPrivs"))]
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        nested = "created" if libc.unshare(0x10000000) == 0 else os.strerror(ctypes.get_errno())  # CLONE_NEWUSER
        print(json.dumps({"ids": [os.getuid(), os.geteuid(), os.getgid()], "groups": os.getgroups(),
                          "caps": caps, "nested_userns": nested, "root": sorted(os.listdir("/root"))}))
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["ids"] == [UIDS[0]] * 3 and res["groups"] == []
    assert "CapEff:\t0000000000000000" in res["caps"] and "NoNewPrivs:\t1" in res["caps"]
    assert res["nested_userns"] != "created"
    allowed = {Path(p).parts[2] for p in proc.isolation["revealed_paths"] + isolation.runtime_paths()
               if p.startswith("/root/")}
    assert set(res["root"]) <= allowed, res["root"]  # only the way to the interpreter
    assert jobdir.stat().st_uid == UIDS[0] and jobdir.stat().st_mode & 0o777 == 0o700


def test_sees_only_its_own_processes(jobdir: Path):
    marker = f"squeeze-visible-{uuid.uuid4().hex}"
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        proc, out, err = run_py(
            """
            import json, os
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            cmds = [open(f"/proc/{p}/cmdline", "rb").read().decode("latin-1") for p in pids]
            print(json.dumps({"pids": pids, "cmds": cmds, "me": os.getpid()}))
            """,
            jobdir,
        )
        assert proc.returncode == 0, err
        res = json.loads(out)
        assert len(res["pids"]) <= 3 and res["me"] <= 3, res  # bwrap's init and the job
        assert not any(marker in c for c in res["cmds"])
        assert "pid" in proc.isolation["namespaces"]
    finally:
        neighbour.kill()
        neighbour.wait()


DAEMON = """
import os, sys, time
marker = {marker!r}
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "import time; time.sleep(120)", marker])
    os._exit(0)
os.wait()
time.sleep(0.5)
print("daemon started", flush=True)
while not os.path.exists("go"):  # the test has seen the daemon on the host
    time.sleep(0.05)
{ending}
"""


@pytest.mark.parametrize("ending", ["", "raise SystemExit(3)", "time.sleep(120)"], ids=["succeeds", "fails",
                                                                                        "killed"])
def test_a_double_forked_setsid_daemon_dies_with_the_job(jobdir: Path, ending: str):
    marker = f"squeeze-daemon-{uuid.uuid4().hex}"
    proc = spawn([sys.executable, "-I", "-c", DAEMON.format(marker=marker, ending=ending)], jobdir, LIMITS)
    try:
        assert proc.stdout.readline() == b"daemon started\n"
        assert host_processes_matching(marker), "the daemon never ran"
        (jobdir / "go").write_text("")
        if ending == "time.sleep(120)":
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor's timeout or cancel
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while host_processes_matching(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_processes_matching(marker) == [], "a process of the job outlived it"
        if ROOT:
            assert uid_slots.processes_of(UIDS[0]) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sysv_shared_memory_dies_with_the_job(jobdir: Path):
    proc, out, err = run_py(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        shmid = libc.shmget(0x5EE2E, 64 << 20, 0o1666)  # IPC_CREAT | 0666, 64 MiB
        print(shmid, ctypes.get_errno())
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    shmid = int(out.split()[0])
    assert shmid >= 0, out
    host = Path("/proc/sysvipc/shm").read_text().split("\n")[1:]
    assert not any(line.split() and line.split()[0] == str(0x5EE2E) for line in host), host
    assert "ipc" in proc.isolation["namespaces"]


def test_killpg_kills_the_whole_sandbox(jobdir: Path):
    code = """
    import subprocess, sys, time
    g = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(300)", "grandchild-{m}"])
    open("started", "w").write("1")
    time.sleep(300)
    """
    marker = uuid.uuid4().hex
    proc = spawn([sys.executable, "-I", "-c", textwrap.dedent(code.format(m=marker))], jobdir, LIMITS)
    try:
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
        deadline = time.monotonic() + 30
        while not (jobdir / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchildren = host_processes_matching(f"grandchild-{marker}")
        assert grandchildren
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert all(pid_gone(p) for p in grandchildren)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sandbox_dies_with_its_supervisor(jobdir: Path):
    marker = f"squeeze-orphan-{uuid.uuid4().hex}"
    intermediate = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from worker.isolation import SandboxLimits, spawn
        from pathlib import Path
        p = spawn([sys.executable, "-I", "-S", "-c", "import time; time.sleep(300)", {marker!r}],
                  Path({str(jobdir)!r}), SandboxLimits(**{dict(vars(LIMITS))!r}), stdout=None, stderr=None)
        print(p.pid, p.isolation["pdeathsig"], flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", intermediate], stdout=subprocess.PIPE, text=True)
    try:
        pid, pdeathsig = parent.stdout.readline().split()
        assert pdeathsig == "True"
        deadline = time.monotonic() + 30
        while not host_processes_matching(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_processes_matching(marker) and not pid_gone(int(pid), timeout=0.3)
        parent.kill()  # SIGKILL: no cleanup code in the supervisor runs
        parent.wait()
        assert pid_gone(int(pid)), "bwrap outlived its supervisor"
        deadline = time.monotonic() + 10
        while host_processes_matching(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_processes_matching(marker) == [], "the job outlived its supervisor"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# --------------------------------------------------------------------------- limits


def test_memory_limit_stops_a_big_allocation(jobdir: Path):
    proc, out, err = run_py(
        """
        block = bytearray(1 << 30)   # 1 GiB > 512 MiB
        print("allocated", flush=True)
        """,
        jobdir,
        limits(memory_bytes=512 << 20),
    )
    assert "allocated" not in out and proc.returncode != 0
    assert "MemoryError" in err or proc.returncode > 128, err
    assert proc.isolation["rlimits"]["AS"] == 512 << 20


def test_rlimits_applied(jobdir: Path):
    proc, out, err = run_py(
        """
        import json, resource as r
        print(json.dumps({n: r.getrlimit(getattr(r, "RLIMIT_" + n))[0]
                          for n in ("AS", "CPU", "FSIZE", "CORE", "NPROC")}))
        try:
            with open("big", "wb") as f:
                f.write(b"x" * (2 << 20))
        except OSError as e:
            print("fsize", e.errno)
        """,
        jobdir,
        limits(memory_bytes=1 << 30, cpu_seconds=7, file_bytes=1 << 20, max_processes=33),
    )
    assert proc.returncode == 0, err
    lines = out.splitlines()
    got = json.loads(lines[0])
    assert got["AS"] == 1 << 30 and got["CPU"] == 7 and got["FSIZE"] == 1 << 20 and got["CORE"] == 0
    if ROOT:
        assert got["NPROC"] == 33
    assert lines[1] == "fsize 27"  # EFBIG (SIGXFSZ is ignored by Python)
    assert (jobdir / "big").stat().st_size <= 1 << 20


FORK_LOOP = """
import os, time
n = 0
while n < 100_000:
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    except OSError:
        break
"""
FORK_BOMB = FORK_LOOP + """
open("forks", "w").write(str(n))
time.sleep(60)
"""


@needs_root
def test_a_fork_bomb_is_capped_per_job_and_another_job_still_starts(tmp_path: Path):
    bomb_dir, other_dir = tmp_path / "bomb", tmp_path / "other"
    prepare_jobdir(bomb_dir, limits(max_processes=40))
    bomb = spawn([sys.executable, "-I", "-S", "-c", FORK_BOMB], bomb_dir, limits(max_processes=40))
    try:
        deadline = time.monotonic() + 60
        while not (bomb_dir / "forks").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0 < int((bomb_dir / "forks").read_text()) < 40
        other = limits(uid=UIDS[1], max_processes=40)
        prepare_jobdir(other_dir, other)
        proc, out, err = run_py("import subprocess; print(subprocess.run(['true']).returncode)", other_dir, other)
        assert proc.returncode == 0 and out.strip() == "0", err
    finally:
        os.killpg(bomb.pid, signal.SIGKILL)
        bomb.wait()
    # the PID namespace takes every fork with it (the kernel's teardown may take a moment)
    assert uid_slots.kill_processes_of(UIDS[0], grace=5.0) == []


# --------------------------------------------------------------------------- slots


def test_uid_slots_are_exclusive_and_reused(tmp_path: Path):
    with uid_slots.slot(UIDS[0], 2, tmp_path) as a, uid_slots.slot(UIDS[0], 2, tmp_path) as b:
        assert {a, b} == set(UIDS)
        with pytest.raises(uid_slots.NoFreeSlot, match="SQUEEZE_SANDBOX_UID_COUNT"):
            with uid_slots.slot(UIDS[0], 2, tmp_path):
                pass
    with uid_slots.slot(UIDS[0], 2, tmp_path) as again:
        assert again == UIDS[0]


@needs_root
def test_a_slot_kills_what_a_dead_worker_left_running(tmp_path: Path):
    marker = f"squeeze-stale-{uuid.uuid4().hex}"
    stale = subprocess.Popen(["setpriv", f"--reuid={UIDS[1]}", f"--regid={UIDS[1]}", "--clear-groups",
                              sys.executable, "-I", "-S", "-c", "import time; time.sleep(60)", marker])
    try:
        deadline = time.monotonic() + 10
        while not uid_slots.processes_of(UIDS[1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        with uid_slots.slot(UIDS[1], 1, tmp_path) as uid:
            assert uid == UIDS[1] and uid_slots.processes_of(uid) == []
        assert stale.wait(timeout=10) == -signal.SIGKILL
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()


# --------------------------------------------------------------------------- the real payload


def test_torch_numpy_onnxruntime_and_worker_import_in_sandbox(jobdir: Path):
    proc, out, err = run_py(
        """
        import os
        import torch, numpy, onnxruntime
        import worker, worker.isolation
        print(os.getuid(), worker.__file__, float(torch.ones(4).sum()), numpy.__version__)
        """,
        jobdir,
        extra_env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, err
    uid, worker_file, total, _ = out.split()
    assert worker_file == str(REPO / "worker" / "__init__.py")
    assert float(total) == 4.0
    if ROOT:
        assert int(uid) == UIDS[0]


# --------------------------------------------------------------------------- failures


def test_missing_executable_fails(jobdir: Path):
    proc = spawn([str(jobdir / "no-such-binary")], jobdir, LIMITS)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and b"no-such-binary" in err


@needs_root
def test_root_without_a_job_uid_refuses(jobdir: Path):
    with pytest.raises(SandboxError, match="uid of its own"):
        spawn([sys.executable, "-c", "pass"], jobdir, limits(uid=None))


def test_without_bubblewrap_it_fails_closed_unless_weak_is_allowed(jobdir: Path, monkeypatch):
    monkeypatch.setattr(isolation, "bwrap_path", lambda: None)
    with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
        spawn([sys.executable, "-c", "pass"], jobdir, LIMITS)
    proc, out, err = run_py("import os; print(len(os.listdir('/proc')))", jobdir, limits(allow_weak=True))
    assert proc.returncode == 0, err
    assert proc.isolation["mode"] == "weak" and proc.isolation["namespaces"] == []
    assert any("no bubblewrap" in m for m in proc.isolation["missing"])


def test_describe_reports_what_is_applied():
    info = describe()
    assert info["mode"] == ("bwrap-root" if ROOT else "bwrap-user"), info
    assert set(info["namespaces"]) >= {"pid", "net", "ipc", "mnt", "uts", "user"}
    assert info["empty_environment"] and info["own_process_group"] and info["no_new_privs"] and info["pdeathsig"]
    assert set(info["rlimits"]) >= {"CPU", "FSIZE", "CORE"}  # AS too, unless a memory cgroup replaces it
    if ROOT:  # tests/worker/test_cgroups.py covers the cgroup, and its "missing" line on a host without one
        assert info["per_job_uid"] and info["uid"] != 0
        assert [m for m in info["missing"] if not m.startswith("no cgroup")] == []


def test_open_job_file_refuses_planted_links(jobdir: Path):
    proc, out, err = run_py(
        """
        import os
        os.mkdir("out")
        open("out/model.onnx", "wb").write(b"weights")
        os.symlink("/etc/passwd", "out/evil.onnx")
        os.symlink("/etc", "linkdir")
        os.mkfifo("out/fifo.onnx")
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    with open_job_file(jobdir, "out/model.onnx") as f:
        assert f.read() == b"weights"
    for bad in ("out/evil.onnx", "linkdir/passwd", "out/fifo.onnx", "../job/out/model.onnx", "/etc/passwd"):
        with pytest.raises(SandboxError):
            open_job_file(jobdir, bad)
    with pytest.raises(SandboxError):
        open_job_file(jobdir, "out/model.onnx", max_bytes=3)


def test_a_worker_with_umask_077_and_a_0700_data_dir_still_starts_jobs(tmp_path: Path):
    """The worker creates its files 0600 (umask 077); the mount points that reveal the job dir must not be."""
    data = tmp_path / "data"
    job = data / "jobs" / "j-1"
    old = os.umask(0o077)
    try:
        prepare_jobdir(job, LIMITS)
        data.chmod(0o700)
        proc, out, err = run_py("import os; print(os.getcwd())", job)
    finally:
        os.umask(old)
    assert proc.returncode == 0, err
    assert out.strip() == str(job.resolve())


def test_a_tree_it_reads_under_tmp_stays_visible(jobdir: Path, tmp_path: Path):
    """A checkout or venv under /tmp (CI clones into a temp folder) must not vanish under the private /tmp."""
    tree = tmp_path / "checkout"
    tree.mkdir()
    (tree / "module.txt").write_text("from the checkout")
    (tree / "module.txt").chmod(0o644)  # an in-process API test earlier in the run may have set umask 077
    tree.chmod(0o755)
    proc, out, err = run_py(f"print(open({str(tree / 'module.txt')!r}).read())", jobdir, readable_paths=[tree])
    assert proc.returncode == 0, err
    assert out.strip() == "from the checkout"
