"""Real-process tests of the sandbox isolation (worker/isolation.py). No mocks."""

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

from worker import isolation
from worker.isolation import SandboxError, SandboxLimits, open_job_file, prepare_jobdir, spawn

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (uid drop, namespaces)")
REPO = Path(__file__).resolve().parents[2]

LIMITS = SandboxLimits(
    memory_bytes=2 << 30, cpu_seconds=60, file_bytes=256 << 20, max_processes=64
)


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    prepare_jobdir(d, LIMITS)
    return d


def run_py(code: str, jobdir: Path, limits: SandboxLimits = LIMITS, timeout: float = 120, **kw):
    proc = spawn([sys.executable, "-I", "-c", textwrap.dedent(code)], jobdir, limits, **kw)
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
        # also look where a leaked secret could hide: our own /proc environ
        env["_raw"] = open("/proc/self/environ", "rb").read().decode("latin-1")
        print(json.dumps(env))
        """,
        jobdir,
        extra_env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, err
    env = json.loads(out)
    raw = env.pop("_raw")
    assert secret not in out and secret not in raw
    assert set(env) == {"PATH", "HOME", "LANG", "TMPDIR", "OMP_NUM_THREADS"}
    assert env["HOME"] == str(jobdir.resolve())
    assert env["TMPDIR"].startswith(str(jobdir.resolve()) + "/")
    assert env["LANG"] == "C.UTF-8"
    assert env["OMP_NUM_THREADS"] == "1"
    assert proc.isolation["empty_environment"] is True


# --------------------------------------------------------------------------- filesystem


def test_writes_outside_jobdir_never_reach_the_host(jobdir: Path):
    name = f"squeeze-escape-{uuid.uuid4().hex}"
    targets = {
        "tmp": f"/tmp/{name}",
        "var_tmp": f"/var/tmp/{name}",
        "shm": f"/dev/shm/{name}",
        "parent": str(jobdir.parent / name),
        "repo": str(REPO / name),
        "etc": f"/etc/{name}",
    }
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
        with open("inside.txt", "w") as f:
            f.write("hello from the sandbox")
        res["cwd"] = os.getcwd()
        print(json.dumps(res))
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    res = json.loads(out)
    for key, path in targets.items():
        assert not os.path.exists(path), f"{key}: sandbox write reached the host at {path}"
    if ROOT:
        # Not even into the throw-away view: parent dir is a root-owned mask,
        # everything else is read-only or root-owned.
        for key in ("parent", "repo", "etc"):
            assert res[key] != "written", (key, res)
    assert res["cwd"] == str(jobdir.resolve())
    assert (jobdir / "inside.txt").read_text() == "hello from the sandbox"


def test_jobdir_under_tmp_stays_at_the_same_path(jobdir: Path):
    assert str(jobdir.resolve()).startswith("/tmp/")  # pytest's tmp_path
    proc, out, err = run_py(
        f"""
        import os
        assert os.getcwd() == {str(jobdir.resolve())!r}, os.getcwd()
        with open({str(jobdir.resolve() / "abs.txt")!r}, "w") as f:
            f.write("by absolute path")
        print(sorted(os.listdir("/tmp")))
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    assert (jobdir / "abs.txt").read_text() == "by absolute path"
    if proc.isolation["mount_namespace"]:
        # The private /tmp shows only the paths down to this job and to the interpreter and project
        # (when a checkout lives under /tmp, as a CI clone may), no other host files.
        needed = [str(jobdir.resolve()), *isolation.runtime_paths()]
        expected = {Path(p).relative_to("/tmp").parts[0] for p in needed if p.startswith("/tmp/")}
        seen = set(eval(out))
        assert seen <= expected, (seen, expected)


def test_jobdir_outside_tmp(tmp_path: Path):
    base = REPO / ".squeeze" / f"test-isolation-{uuid.uuid4().hex}"
    try:
        job = base / "job"
        prepare_jobdir(job, LIMITS)
        (base / "sibling-secret.txt").parent.mkdir(parents=True, exist_ok=True)
        (base / "sibling-secret.txt").write_text("other job's data")
        proc, out, err = run_py(
            """
            import os
            open("made.txt", "w").write("ok")
            print(os.path.exists(os.path.join(os.path.dirname(os.getcwd()), "sibling-secret.txt")))
            """,
            job,
        )
        assert proc.returncode == 0, err
        assert (job / "made.txt").read_text() == "ok"
        if proc.isolation["mount_namespace"]:
            assert out.strip() == "False"  # sibling job dirs are masked
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
        res = json.loads(out)
        if not proc.isolation["network_namespace"]:
            pytest.skip("no network namespace on this host: " + "; ".join(proc.isolation["missing"]))
        assert all(v != "connected" for v in res.values()), res
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the parent's listener
    finally:
        server.close()


# --------------------------------------------------------------------------- identity


@needs_root
def test_runs_as_unprivileged_uid(jobdir: Path):
    proc, out, err = run_py(
        """
        import os
        print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())
        status = open("/proc/self/status").read()
        print([l for l in status.splitlines() if l.startswith(("CapEff", "NoNewPrivs"))])
        """,
        jobdir,
    )
    assert proc.returncode == 0, err
    ids, caps = out.splitlines()
    uid, euid, gid, groups = ids.split(" ", 3)
    assert int(uid) != 0 and int(euid) != 0 and int(gid) != 0
    assert groups == "[]"
    assert "CapEff:\\t0000000000000000" in caps and "NoNewPrivs:\\t1" in caps
    # root's home is masked; the interpreter tree inside it is still reachable
    proc, out, err = run_py("import os; print(sorted(os.listdir('/root')))", jobdir)
    assert proc.returncode == 0, err
    visible = eval(out)
    allowed = {Path(p).parts[2] for p in proc.isolation["reexposed_paths"] if p.startswith("/root/")}
    assert set(visible) <= allowed, visible  # only the way to the interpreter, no keys etc.


@needs_root
def test_jobdir_is_given_to_the_sandbox_user(jobdir: Path):
    st = jobdir.stat()
    assert st.st_uid != 0 and st.st_uid == proc_uid(jobdir)


def proc_uid(jobdir: Path) -> int:
    proc, out, err = run_py("import os; print(os.getuid())", jobdir)
    assert proc.returncode == 0, err
    return int(out)


# --------------------------------------------------------------------------- process control


def test_killpg_kills_the_whole_group(jobdir: Path):
    proc = spawn(
        [
            sys.executable,
            "-I",
            "-c",
            textwrap.dedent(
                """
                import subprocess, sys, time
                g = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(300)"])
                open("grandchild.pid", "w").write(str(g.pid))
                time.sleep(300)
                """
            ),
        ],
        jobdir,
        LIMITS,
    )
    try:
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
        pidfile = jobdir / "grandchild.pid"
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        gpid = int(pidfile.read_text())
        assert os.getpgid(gpid) == proc.pid
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert pid_gone(gpid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_child_dies_with_its_parent_pdeathsig(jobdir: Path):
    intermediate = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from worker.isolation import SandboxLimits, spawn
        from pathlib import Path
        limits = SandboxLimits(**{dict(vars(LIMITS))!r})
        p = spawn([sys.executable, "-I", "-S", "-c", "import time; time.sleep(300)"],
                  Path({str(jobdir)!r}), limits, stdout=None, stderr=None)
        print(p.pid, p.isolation["pdeathsig"], flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", intermediate], stdout=subprocess.PIPE, text=True
    )
    try:
        line = parent.stdout.readline()
        child_pid, pdeathsig = line.split()
        child_pid = int(child_pid)
        assert pdeathsig == "True"
        assert not pid_gone(child_pid, timeout=0.5)  # still running while its parent lives
        parent.kill()  # SIGKILL: no cleanup code in the parent runs
        parent.wait()
        assert pid_gone(child_pid), "sandbox outlived its supervisor"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# --------------------------------------------------------------------------- limits


def test_memory_limit_stops_a_big_allocation(jobdir: Path):
    limits = SandboxLimits(memory_bytes=256 << 20, cpu_seconds=30, file_bytes=1 << 20, max_processes=64)
    proc, out, err = run_py(
        """
        import os, resource
        print(resource.getrlimit(resource.RLIMIT_AS), flush=True)
        block = bytearray(1 << 30)   # 1 GiB > 256 MiB
        print("allocated", flush=True)
        """,
        jobdir,
        limits,
    )
    assert "allocated" not in out
    assert proc.returncode != 0
    assert "MemoryError" in err or proc.returncode < 0, err
    assert proc.isolation["rlimits"]["AS"] == 256 << 20


def test_rlimits_applied(jobdir: Path):
    limits = SandboxLimits(memory_bytes=1 << 30, cpu_seconds=7, file_bytes=1 << 20, max_processes=33)
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
        limits,
    )
    assert proc.returncode == 0, err
    lines = out.splitlines()
    got = json.loads(lines[0])
    assert got["AS"] == 1 << 30 and got["CPU"] == 7 and got["FSIZE"] == 1 << 20 and got["CORE"] == 0
    if ROOT:
        assert got["NPROC"] == 33
    assert lines[1] == "fsize 27"  # EFBIG (SIGXFSZ is ignored by Python)
    assert (jobdir / "big").stat().st_size <= 1 << 20


# --------------------------------------------------------------------------- the real payload


def test_torch_numpy_onnxruntime_and_worker_import_in_sandbox(jobdir: Path):
    proc, out, err = run_py(
        """
        import os, sys
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
        assert int(uid) != 0


# --------------------------------------------------------------------------- failures


def test_missing_executable_raises(jobdir: Path):
    with pytest.raises(SandboxError, match="cannot execute"):
        spawn([str(jobdir / "no-such-binary")], jobdir, LIMITS)


@needs_root
def test_unknown_sandbox_user_raises(jobdir: Path):
    with pytest.raises(SandboxError, match="does not exist"):
        spawn([sys.executable, "-c", "pass"], jobdir, SandboxLimits(1 << 30, 10, 1 << 20, 10, user="no-such-user-x"))


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_fails_closed_as_root_without_namespaces(jobdir: Path):
    """Root that cannot create namespaces (no CAP_SYS_ADMIN) must not run the model."""
    marker = jobdir / "ran-as-root"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from worker.isolation import SandboxError, SandboxLimits, spawn
        try:
            p = spawn([sys.executable, "-I", "-c", "open('ran-as-root', 'w')"],
                      Path({str(jobdir)!r}), SandboxLimits(1 << 30, 10, 1 << 20, 64))
        except SandboxError as e:
            print("REFUSED", e)
        else:
            p.wait()
            print("RAN", p.isolation)
        """
    )
    res = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("REFUSED"), res.stdout
    assert "unshare" in res.stdout
    assert not marker.exists()


# --------------------------------------------------------------------------- unprivileged path


@needs_root
def test_unprivileged_caller_gets_user_namespace_or_honest_report(jobdir: Path):
    """spawn() called by a non-root process (here: from inside a root-made sandbox,
    as `nobody`): user-namespace isolation when the kernel allows it, and a
    report that never claims what is not applied."""
    outer = textwrap.dedent(
        """
        import json, os, pathlib, socket, sys
        from worker.isolation import SandboxLimits, prepare_jobdir, spawn
        assert os.geteuid() != 0
        limits = SandboxLimits(1 << 30, 30, 16 << 20, 64)
        job = pathlib.Path.cwd() / "inner" / "job"
        prepare_jobdir(job, limits)
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        code = f'''
        import json, os, socket
        res = {{"uid": os.getuid()}}
        open("/tmp/inner-escape", "w").write("x")
        try:
            socket.create_connection(("127.0.0.1", {srv.getsockname()[1]}), timeout=3); res["net"] = "connected"
        except OSError as e:
            res["net"] = str(e)
        open("ok.txt", "w").write("ok")
        print(json.dumps(res))
        '''
        p = spawn([sys.executable, "-I", "-c", code.replace("\\n        ", "\\n")], job, limits)
        out, err = p.communicate(timeout=120)
        print(json.dumps({"rc": p.returncode, "out": out.decode(), "err": err.decode(),
                          "iso": p.isolation, "tmp_escape": os.path.exists("/tmp/inner-escape"),
                          "ok": (job / "ok.txt").exists()}))
        """
    )
    proc, out, err = run_py(outer, jobdir, SandboxLimits(2 << 30, 120, 64 << 20, 64))
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["rc"] == 0, res["err"]
    iso = res["iso"]
    inner = json.loads(res["out"])
    assert res["ok"]
    assert iso["uid_dropped"] is False and any("uid drop" in m for m in iso["missing"])
    assert iso["empty_environment"] and iso["own_process_group"] and iso["pdeathsig"]
    if iso["network_namespace"]:
        assert inner["net"] != "connected"
    else:
        assert any("network" in m for m in iso["missing"])
    if iso["mount_namespace"]:
        assert not res["tmp_escape"]
        assert iso["mode"] == "userns"
    else:
        assert iso["mode"] == "degraded" and any("mount" in m for m in iso["missing"])


def test_describe_reports_what_is_applied():
    info = isolation.describe()
    assert info["mode"] in ("root", "userns", "degraded")
    assert info["empty_environment"] is True and info["own_process_group"] is True
    assert set(info["rlimits"]) >= {"AS", "CPU", "FSIZE", "CORE"}
    assert info["pid_namespace"] is False
    if ROOT:
        assert info["mode"] == "root"
        assert info["network_namespace"] and info["mount_namespace"] and info["uid_dropped"]
        assert info["uid"] != 0 and info["readonly_mounts"]
        assert "/tmp" in info["private_tmp"]


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
