"""Upload screening through HTTP: zip bombs of many small entries, the screening time budget, and an API that keeps
answering while an upload is screened (screening runs in a child process, off the event loop and thread pool).

tests/app/files/test_screening.py checks the screening functions themselves (and imports the builders below).
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tests.app.api.routes.test_api import tiny_onnx, upload_model


def slow_onnx(nodes: int) -> bytes:
    """A wire-valid ONNX model whose graph holds `nodes` empty nodes: 2 bytes each, about 1 us each to walk."""
    graph = b"\x0a\x00" * nodes
    n, size = len(graph), bytearray()
    while True:
        size.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return b"\x08\x07" + b"\x3a" + bytes(size) + graph  # ir_version 7, graph


def deflated_copies(path: Path, names: list[str], data: bytes, extra: dict[str, bytes] | None = None) -> Path:
    """A deflated zip holding `data` under each name, compressed once (zeros deflate at 11 MB/s per entry at level 6:
    64 x 8 MiB compressed one by one take 6 s)."""
    co = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate, as zipfile writes it
    raw = co.compress(data) + co.flush()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in (extra or {}).items():
            z.writestr(name, body)
        for name in names:
            info = zipfile.ZipInfo(name)
            info.compress_type, info.file_size, info.compress_size = zipfile.ZIP_DEFLATED, len(data), len(raw)
            info.CRC, info.header_offset = zlib.crc32(data), z.fp.tell()
            z.fp.write(info.FileHeader())
            z.fp.write(raw)
            z.filelist.append(info)
            z.NameToInfo[name] = info
            z.start_dir = z.fp.tell()
    with zipfile.ZipFile(path) as z:  # a valid zip, its entries inflating back to `data`
        assert len(z.infolist()) == len(names) + len(extra or {}) and z.read(names[-1]) == data
    return path


def npy_zeros(size: int) -> bytes:
    """A valid .npy of uint8 zeros, `size` bytes long header included."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (size - 128,)})
    assert len(header.getvalue()) == 128
    return header.getvalue() + b"\0" * (size - 128)


def assert_nothing_stored(client, data_dir: Path) -> None:
    assert client.get("/v1/models").json()["data"] == [] and client.get("/v1/datasets").json()["data"] == []
    blobs = data_dir / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    tmp = data_dir / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


def test_many_small_entries_bomb_refused(api, tmp_path):
    """64 valid arrays of 8 MiB - 1 of zeros, 1016:1 each: a 0.5 MB upload the sandbox would inflate to 512 MiB."""
    from app.core.config import get_settings

    npz = deflated_copies(tmp_path / "bomb.npz", [f"x{i}.npy" for i in range(64)], npy_zeros(8 * 1024 * 1024 - 1))
    r = api.post("/v1/datasets", params={"name": "bomb.npz"}, content=npz.read_bytes())
    assert r.status_code == 413 and r.json()["error"]["code"] == "zip_bomb", r.text
    assert "ZIP_STORED" in r.json()["error"]["message"]
    assert_nothing_stored(api, get_settings().data_dir)
    assert upload_model(api, tiny_onnx()).status_code == 201  # an ordinary model still passes


def test_upload_over_the_screening_budget_is_refused(api, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "screening_timeout_s", 1.0)
    start = time.monotonic()
    r = upload_model(api, slow_onnx(5_000_000))  # 10 MB, 5 s or more to screen
    elapsed = time.monotonic() - start
    assert r.status_code == 422 and r.json()["error"]["code"] == "screening_timeout", r.text
    assert r.json()["error"]["details"]["timeout_s"] == 1.0
    assert elapsed < 6, f"refused after {elapsed:.1f} s"
    assert_nothing_stored(api, get_settings().data_dir)
    monkeypatch.setattr(get_settings(), "screening_timeout_s", 60.0)
    assert upload_model(api, tiny_onnx()).status_code == 201


def test_api_answers_while_uploads_are_screened(stack_factory):
    """A live server: three uploads whose screening runs past a 3 s budget; meanwhile /healthz and a database route
    (both synchronous routes, on the thread pool screening used to take) answer within 1 s, and afterwards no
    screening process is left behind."""
    import httpx
    import psutil

    stack = stack_factory("sqlite", SQUEEZE_SCREENING_TIMEOUT_S="3")
    stack.start_api()
    body, results = slow_onnx(10_000_000), []  # 20 MB, 10 s or more to screen

    def upload() -> None:
        start = time.monotonic()
        r = stack.admin.post("/v1/models", params={"name": "slow.onnx"}, content=body)
        results.append((r.status_code, r.json()["error"]["code"], time.monotonic() - start))

    uploads = [threading.Thread(target=upload) for _ in range(3)]
    for t in uploads:
        t.start()
    latencies: list[float] = []
    with httpx.Client(base_url=stack.url, headers=stack.admin.headers, timeout=10) as probe:
        while any(t.is_alive() for t in uploads):
            for path in ("/healthz", "/v1/models"):
                start = time.monotonic()
                assert probe.get(path).status_code == 200
                latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    for t in uploads:
        t.join()
    assert len(latencies) >= 20 and max(latencies) < 1, f"{len(latencies)} probes, slowest {max(latencies):.2f} s"
    assert [(status, code) for status, code, _ in results] == [(422, "screening_timeout")] * 3
    assert max(elapsed for *_, elapsed in results) < 15, results
    assert psutil.Process(stack.api_proc.pid).children(recursive=True) == []
    assert_nothing_stored(stack.admin, stack.data_dir)


def pt2_with_big_program(path: Path, numbers: int) -> Path:
    """A .pt2 whose program JSON (models/model.json, which screening parses for the input shapes) is replaced by a
    list of `numbers` zeros: 2 bytes each on disk, 8 each as a parsed Python list (plus the text and bytes read)."""
    import torch

    from tests.app.files.test_screening import rezip

    program = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),))
    torch.export.save(program, path)
    big = b'{"padding": [' + b"0," * (numbers - 1) + b"0]}"
    path.write_bytes(rezip(path, replace={"models/model.json": big}))
    return path


def test_screening_past_its_memory_limit_is_refused(api, monkeypatch, tmp_path):
    """A .pt2 whose 50 MB program JSON takes about 200 MB to parse: past a 128 MiB limit the child stops with a
    MemoryError and the upload gets 413 screening_memory, nothing stored; under the default limit it is stored."""
    from app.core.config import get_settings

    body = pt2_with_big_program(tmp_path / "big.pt2", 25_000_000).read_bytes()
    monkeypatch.setattr(get_settings(), "screening_memory_bytes", 128 * 2**20)
    r = upload_model(api, body, name="big.pt2")
    assert r.status_code == 413 and r.json()["error"]["code"] == "screening_memory", r.text
    assert "SQUEEZE_SCREENING_MEMORY_BYTES" in r.json()["error"]["message"]
    assert_nothing_stored(api, get_settings().data_dir)
    monkeypatch.setattr(get_settings(), "screening_memory_bytes", 2**30)
    assert upload_model(api, body, name="big.pt2").status_code == 201


def test_screenings_wait_for_a_free_slot(stack_factory):
    """A live server screening one upload at a time (SQUEEZE_SCREENING_CONCURRENCY=1): two slow uploads sent at
    once never run two screening children together, and the second is screened (with its own full budget) once
    the first is done."""
    import psutil

    stack = stack_factory("sqlite", SQUEEZE_SCREENING_TIMEOUT_S="2", SQUEEZE_SCREENING_CONCURRENCY="1")
    stack.start_api()
    body, results = slow_onnx(10_000_000), []  # 20 MB, 10 s or more to screen

    def upload() -> None:
        start = time.monotonic()
        r = stack.admin.post("/v1/models", params={"name": "slow.onnx"}, content=body)
        results.append((r.status_code, r.json()["error"]["code"], time.monotonic() - start))

    uploads = [threading.Thread(target=upload) for _ in range(2)]
    for t in uploads:
        t.start()
    api = psutil.Process(stack.api_proc.pid)
    most = 0
    while any(t.is_alive() for t in uploads):
        most = max(most, len(api.children(recursive=True)))
        time.sleep(0.02)
    assert most == 1, f"{most} screening children ran at once"
    assert [(status, code) for status, code, _ in results] == [(422, "screening_timeout")] * 2
    first, second = sorted(elapsed for *_, elapsed in results)
    assert second >= first + 1.5, results  # the second waited for the first's slot, then had its own 2 s
