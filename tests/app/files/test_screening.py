"""Static screening of uploads, against real files made with torch / onnx / numpy here.

Only this test imports torch: app.files.screening must not. Malicious pickles are built with
pickle.dumps or by hand and are never loaded; each test checks the payload's marker file
never appears.
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import random
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.files import screening
from app.files.screening import ScreeningError, scan_pickle, sniff_dataset, sniff_model
from app.files.screening.zips import entry_copy
from tests.app.files.test_upload_screening import deflated_copies, npy_zeros, slow_onnx

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

LIMITS = dict(max_unpacked_bytes=1 << 34, max_entries=10_000)
REPO = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------------------- helpers

class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)) * self.scale + torch.tensor([1.0, 2.0, 3.0])


def refused(fn, path: Path, status: int, code: str, **limits) -> ScreeningError:
    with pytest.raises(ScreeningError) as info:
        fn(path, **{**LIMITS, **limits})
    err = info.value
    assert (err.status, err.code) == (status, code), repr(err)
    assert err.message
    return err


def rezip(src: Path | bytes, dst: Path | None = None, *, replace: dict[str, bytes] | None = None,
          add: dict[str, bytes] | None = None) -> bytes:
    """Copies a zip (stored, like torch writes), replacing entries chosen by name suffix."""
    replace = dict(replace or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(src if isinstance(src, Path) else io.BytesIO(src)) as zin, \
            zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    if dst is not None:
        dst.write_bytes(buf.getvalue())
    return buf.getvalue()


def member(path: Path, suffix: str) -> tuple[str, bytes]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(suffix))
        return name, z.read(name)


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    ep = torch.export.export(Tiny().eval(), (torch.randn(2, 4),))
    torch.export.save(ep, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a screened payload ran"


class Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def stack_global_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol 4 pickle calling module.name(arg), with both names fetched back from the memo so that a
    scanner which only looks at the opcodes right before STACK_GLOBAL cannot see them."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
    return (b"\x80\x04" + s(module) + b"\x94" + s(name) + b"\x94" + b"00"  # MEMOIZE x2, POP x2
            + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
            + s(arg) + b"\x85R.")  # TUPLE1, REDUCE, STOP


# ---------------------------------------------------------------------------------------- pt2

def test_real_pt2_accepted(pt2):
    got = sniff_model(pt2, **LIMITS)
    assert got.kind == "pt2"
    assert got.details["models"] == ["model"]
    assert got.details["archive_version"] == "0"
    assert got.details["pickled_entries"] == ["tiny/data/sample_inputs/model.pt"]
    assert set(got.details["pickle_globals"]) <= {
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}


def test_pt2_recognised_by_layout_not_name(pt2, tmp_path):
    renamed = tmp_path / "upload.bin"
    renamed.write_bytes(pt2.read_bytes())
    assert sniff_model(renamed, **LIMITS).kind == "pt2"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn, torch.uint16])
def test_pt2_sample_inputs_of_other_dtypes_accepted(tmp_path, dtype):
    class Cast(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.float32) * 2

    path = tmp_path / "cast.pt2"
    torch.export.save(torch.export.export(Cast(), (torch.ones(3).to(dtype),)), path)
    assert sniff_model(path, **LIMITS).kind == "pt2"


def test_pt2_with_reduce_payload_in_sample_inputs_refused(pt2, tmp_path, marker):
    name, inner = member(pt2, "data/sample_inputs/model.pt")
    evil_inner = rezip(inner, replace={"data.pkl": pickle.dumps(Evil(f"touch {marker}"), protocol=2)})
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, replace={name: evil_inner})
    err = refused(sniff_model, bad, 415, "unsafe_pickle")
    assert err.details["global"] in ("posix.system", "os.system")
    assert "data/sample_inputs/model.pt" in err.details["entry"]


def test_pt2_with_raw_pickle_as_sample_inputs_refused(pt2, tmp_path, marker):
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, replace={"data/sample_inputs/model.pt": pickle.dumps(Evil(f"touch {marker}"), protocol=2)})
    refused(sniff_model, bad, 415, "unsafe_pickle")


@pytest.mark.parametrize("module,name", [
    ("builtins", "exec"),
    ("torch", "load"),  # an allowed-looking module
    ("torch._utils", "_rebuild_tensor_v2.__globals__"),  # a dotted name under an allowed global
    ("torch.serialization", "load"),
])
def test_pt2_with_stack_global_opaque_constant_refused(pt2, tmp_path, marker, module, name):
    """An opaque constant is unpickled with pickle.loads by torch.export.load: the real bypass route."""
    cfg_name, _ = member(pt2, "data/constants/model_constants_config.json")
    cfg = b'{"config": {"evil": {"path_name": "opaque_obj_0", "is_param": false, "use_pickle": true, "tensor_meta": null}}}'
    payload = stack_global_pickle(module, name, f"open({str(marker)!r}, 'w')")
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, replace={cfg_name: cfg}, add={cfg_name.replace("model_constants_config.json", "opaque_obj_0"): payload})
    err = refused(sniff_model, bad, 415, "unsafe_pickle")
    assert err.details["global"] == f"{module}.{name}"
    assert err.details["entry"].endswith("data/constants/opaque_obj_0")


def test_pt2_with_use_pickle_weight_refused(pt2, tmp_path, marker):
    cfg_name, cfg = member(pt2, "data/weights/model_weights_config.json")
    cfg = cfg.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
    buf = io.BytesIO()
    torch.save(torch.ones(2), buf)
    evil = rezip(buf.getvalue(), replace={"data.pkl": pickle.dumps(Evil(f"touch {marker}"), protocol=2)})
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, replace={cfg_name: cfg, "data/weights/weight_0": evil})
    err = refused(sniff_model, bad, 415, "unsafe_pickle")
    assert err.details["entry"].endswith("weight_0:archive/data.pkl")


def test_pt2_with_path_in_payload_config_refused(pt2, tmp_path):
    cfg_name, cfg = member(pt2, "data/weights/model_weights_config.json")
    cfg = cfg.replace(b'"path_name": "weight_0"', b'"path_name": "../models/model.json"', 1)
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, replace={cfg_name: cfg})
    refused(sniff_model, bad, 415, "path_traversal")


def test_pt2_with_aoti_library_refused(pt2, tmp_path):
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, add={"tiny/data/aotinductor/model/model.so": b"\x7fELF"})
    refused(sniff_model, bad, 415, "native_code")


def test_pt2_unparsable_pickle_refused(pt2, tmp_path):
    name, inner = member(pt2, "data/sample_inputs/model.pt")
    bad = tmp_path / "bad.pt2"
    rezip(pt2, bad, replace={name: rezip(inner, replace={"data.pkl": b"\x80\x02garbage"})})
    refused(sniff_model, bad, 415, "unsafe_pickle")


def test_truncated_and_corrupt_zip(pt2, tmp_path):
    data = pt2.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: len(data) // 2])
    refused(sniff_model, cut, 422, "truncated")
    # flip one byte of a stored weight: the directory is intact, the CRC is not
    name, weight = member(pt2, "data/weights/weight_0")
    offset = data.index(weight)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])
    refused(sniff_model, corrupt, 422, "truncated")


# ---------------------------------------------------------------------------------------- pickles refused outright

def test_raw_torch_save_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Tiny().state_dict(), path, _use_new_zipfile_serialization=False)
    err = refused(sniff_model, path, 415, "pickled_model")
    assert "torch.export.save" in err.message and "model package" in err.message


def test_zip_torch_save_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Tiny().state_dict(), path)
    refused(sniff_model, path, 415, "pickled_model")


def test_torchscript_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    err = refused(sniff_model, path, 415, "torchscript")
    assert "torch.export.save" in err.message


# ---------------------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(Tiny().eval(), (torch.randn(2, 4),), str(path), dynamo=True, external_data=False)
    return path


def test_real_onnx_accepted(onnx_file):
    got = sniff_model(onnx_file, **LIMITS)
    assert got.kind == "onnx"
    assert got.details["ir_version"] == onnx.load(str(onnx_file)).ir_version
    assert got.details["opset_import"]["ai.onnx"] >= 13
    assert got.details["nodes"] > 0 and got.details["tensors"] > 0


def _helper_model(tensor) -> "onnx.ModelProto":
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_helper_onnx_accepted(tmp_path):
    from onnx import numpy_helper
    path = tmp_path / "m.onnx"
    model = _helper_model(numpy_helper.from_array(np.ones(2, np.float32), "w"))
    onnx.save_model(model, str(path))
    got = sniff_model(path, **LIMITS)
    assert (got.kind, got.details["ir_version"]) == ("onnx", model.ir_version)


def test_onnx_external_data_refused(tmp_path):
    from onnx import numpy_helper
    path = tmp_path / "m.onnx"
    model = _helper_model(numpy_helper.from_array(np.ones(1024, np.float32), "w"))
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    refused(sniff_model, path, 415, "external_data")


def _external_tensor(name: str, location: str) -> "onnx.TensorProto":
    from onnx import TensorProto
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[2])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_onnx_external_data_outside_refused(tmp_path):
    tensor = _external_tensor("w", "../../etc/passwd")
    path = tmp_path / "m.onnx"
    path.write_bytes(_helper_model(tensor).SerializeToString())
    refused(sniff_model, path, 415, "external_data")



def test_onnx_external_data_in_subgraph_refused(tmp_path):
    from onnx import TensorProto, helper
    tensor = _external_tensor("c", "/etc/shadow")
    const = helper.make_node("Constant", [], ["y"], value=tensor)
    branch = helper.make_graph([const], "b", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c0"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c0", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    refused(sniff_model, path, 415, "external_data")


def test_truncated_onnx(onnx_file, tmp_path):
    data = onnx_file.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    refused(sniff_model, cut, 422, "truncated")


def test_onnx_without_graph(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x08")  # ir_version 8 and nothing else
    refused(sniff_model, path, 422, "invalid_onnx")


# ---------------------------------------------------------------------------------------- zip structure

def test_zip_bomb_ratio(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.py", "def build_model():\n    pass\n")
        z.writestr("weights.safetensors", b"\0" * (64 * 1024 * 1024))
    assert path.stat().st_size < 1024 * 1024
    refused(sniff_model, path, 413, "zip_bomb")


def test_zip_limits(pt2):
    refused(sniff_model, pt2, 413, "zip_bomb", max_entries=3)
    refused(sniff_model, pt2, 413, "zip_bomb", max_unpacked_bytes=1000)


@pytest.mark.parametrize("name", ["../evil.py", "/etc/cron.d/x", "a/../../x", "a\\..\\x", "C:/x"])
def test_path_traversal(tmp_path, name):
    path = tmp_path / "t.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model.py", "def build_model():\n    pass\n")
        z.writestr(name, b"x")
    err = refused(sniff_model, path, 415, "path_traversal")
    assert err.details["entry"] == name


def test_symlink_entry_refused(tmp_path):
    path = tmp_path / "t.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("weights.safetensors")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
        z.writestr("model.py", "def build_model():\n    pass\n")
    refused(sniff_model, path, 415, "path_traversal")


# ---------------------------------------------------------------------------------------- packages

def _package(path: Path, source: str | None, weights: bool = True, example: bool = True) -> Path:
    from safetensors.torch import save
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        if source is not None:
            z.writestr("model.py", source)
        if weights:
            z.writestr("weights.safetensors", save(Tiny().state_dict()))
        if example:
            z.writestr("example_inputs.safetensors", save({"x": torch.randn(2, 4)}))
    return path


SOURCE = "import torch\n\n\ndef build_model():\n    return torch.nn.Linear(4, 3)\n"


def test_package_accepted(tmp_path):
    got = sniff_model(_package(tmp_path / "p.zip", SOURCE), **LIMITS)
    assert got.kind == "package"
    assert got.details["weights"]["tensors"]["lin.weight"] == {"dtype": "F32", "shape": [3, 4]}
    assert got.details["example_inputs"]["tensors"]["x"]["shape"] == [2, 4]


def test_package_without_build_model(tmp_path):
    err = refused(sniff_model, _package(tmp_path / "p.zip", "def make():\n    pass\n"), 422, "invalid_package")
    assert "build_model" in err.message


def test_package_without_weights(tmp_path):
    err = refused(sniff_model, _package(tmp_path / "p.zip", SOURCE, weights=False), 422, "invalid_package")
    assert err.details["missing"] == ["weights.safetensors"]


def test_package_with_bad_safetensors(tmp_path):
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model.py", SOURCE)
        header = b'{"w": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}}'
        z.writestr("weights.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16)
    refused(sniff_model, path, 422, "truncated")


# ---------------------------------------------------------------------------------------- datasets

def test_npz_accepted(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 1, 8, 8), np.float32), labels=np.arange(5))
    got = sniff_dataset(path, **LIMITS)
    assert got.kind == "npz"
    assert got.details["arrays"]["x"] == {"shape": [5, 1, 8, 8], "dtype": "<f4"}
    assert got.details["arrays"]["labels"]["shape"] == [5]


def test_npz_compressed_accepted(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.ones((3, 2), np.float64))
    assert sniff_dataset(path, **LIMITS).details["arrays"]["x"]["shape"] == [3, 2]


def test_npz_object_array_refused(tmp_path, marker):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([Evil(f"touch {marker}")], dtype=object))
    refused(sniff_dataset, path, 415, "unsafe_pickle")


def test_safetensors_dataset_accepted(tmp_path):
    from safetensors.numpy import save_file
    path = tmp_path / "d.safetensors"
    save_file({"x": np.zeros((4, 3), np.float32), "labels": np.arange(4)}, str(path))
    got = sniff_dataset(path, **LIMITS)
    assert got.kind == "safetensors"
    assert got.details["tensors"]["x"] == {"dtype": "F32", "shape": [4, 3]}


def test_pickled_dataset_refused(tmp_path):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"x": [1, 2]}, protocol=4))
    refused(sniff_dataset, path, 415, "unsafe_pickle")


def test_random_bytes_refused(tmp_path):
    path = tmp_path / "r.bin"
    path.write_bytes(random.Random(0).randbytes(4096))
    err = refused(sniff_model, path, 415, "unsupported_format")
    assert ".pt2" in err.message and ".onnx" in err.message
    err = refused(sniff_dataset, path, 415, "unsupported_format")
    assert ".npz" in err.message


def test_bare_safetensors_is_not_a_model(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file(Tiny().state_dict(), str(path))
    refused(sniff_model, path, 415, "unsupported_format")


# ---------------------------------------------------------------------------------------- the walker itself

def test_scan_pickle_resolves_memo_and_dup():
    assert scan_pickle(io.BytesIO(pickle.dumps({"a": [1, 2.0, "s"]}, protocol=4)), "x") == set()
    ok = stack_global_pickle("collections", "OrderedDict", "")  # called with one arg: fine statically
    assert scan_pickle(io.BytesIO(ok), "x") == {("collections", "OrderedDict")}
    dup = b"\x80\x04\x8c\x08builtins\x8c\x04eval20\x93."  # DUP then POP before STACK_GLOBAL
    with pytest.raises(ScreeningError) as info:
        scan_pickle(io.BytesIO(dup), "x")
    assert info.value.details["global"] == "builtins.eval"
    with pytest.raises(ScreeningError):  # STACK_GLOBAL on something that is not a literal string
        scan_pickle(io.BytesIO(b"\x80\x04\x8c\x08builtinsK\x01\x93."), "x")
    for proto in range(0, 6):
        with pytest.raises(ScreeningError) as info:
            scan_pickle(io.BytesIO(pickle.dumps(Evil("true"), protocol=proto)), "x")
        assert info.value.code == "unsafe_pickle"


def test_allowlist_has_no_dangerous_names():
    modules = {m for m, _ in screening.PICKLE_ALLOWLIST}
    assert modules <= {"collections", "torch", "torch._utils", "torch.storage"}
    assert not any("." in n or n.startswith("_rebuild_from") for _, n in screening.PICKLE_ALLOWLIST)


def test_import_does_not_pull_torch_or_onnx():
    code = ("import sys, app.files.screening; bad = {'torch', 'onnx', 'numpy', 'onnxruntime', 'safetensors'} "
            "& set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------------------------------- zip bombs and slow archives

def _semi_compressible(f, total: int, noise: int = 480) -> None:
    """Writes `total` bytes that deflate about 120:1: under MAX_RATIO, so only the seeks can make them costly."""
    block = os.urandom(noise) + bytes(64 * 1024 - noise)  # 64 KiB apart: out of deflate's 32 KiB window
    for _ in range(total // len(block)):
        f.write(block)


def nested_zip_pt2(pt2: Path, dst: Path, *, reverse: bool, pickles: int = 100) -> Path:
    """pt2 with its sample inputs replaced by a nested zip (deflated in the .pt2) whose 200 MiB padding entry comes
    first and whose directory lists its pickles last to first: read through the outer entry's inflate stream, each
    pickle is a backwards seek that inflates the padding again."""
    inner = dst.with_suffix(".inner")
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as z:
        with z.open("archive/padding", "w", force_zip64=True) as f:
            _semi_compressible(f, 200 * 1024 * 1024)
        for i in range(pickles):
            z.writestr(f"archive/data/p{i}.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        if reverse:
            z.filelist.reverse()  # the central directory is written from filelist at close
    with zipfile.ZipFile(pt2) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith("data/sample_inputs/model.pt"):
                nested = zipfile.ZipInfo(info.filename)
                nested.compress_type = zipfile.ZIP_DEFLATED
                with open(inner, "rb") as src, zout.open(nested, "w", force_zip64=True) as f:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
            else:
                zout.writestr(info, zin.read(info))
    inner.unlink()
    return dst


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
def test_nested_zip_read_backwards_is_quick(pt2, tmp_path, reverse):
    path = nested_zip_pt2(pt2, tmp_path / "nested.pt2", reverse=reverse)
    assert path.stat().st_size < 4 * 1024 * 1024  # a few MB upload...
    start = time.monotonic()
    got = sniff_model(path, **LIMITS)  # ...that took 57-91 s of CPU when read in reverse through the inflate stream
    elapsed = time.monotonic() - start
    assert got.kind == "pt2" and len(got.details["pickled_entries"]) == 1
    assert elapsed < 10, f"screening took {elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == [path]  # the nested copy is gone


def test_nested_zip_copy_is_capped(pt2, tmp_path):
    path = nested_zip_pt2(pt2, tmp_path / "nested.pt2", reverse=True, pickles=1)
    with zipfile.ZipFile(path) as z:
        nested = next(i for i in z.infolist() if i.filename.endswith("sample_inputs/model.pt"))
        with pytest.raises(ScreeningError) as info, \
                entry_copy(z, nested.filename, cap=nested.file_size - 1, tmp_dir=tmp_path):
            pass
    assert (info.value.status, info.value.code) == (413, "zip_bomb")


def test_many_small_entries_bomb(tmp_path):
    """64 entries of 8 MiB - 1 of zeros (1016:1 each): each entry stayed under the 8 MiB the ratio was checked from,
    and the sandbox extracted the 512 MiB on every job."""
    size = 8 * 1024 * 1024 - 1  # valid arrays of zeros: the old screening accepted both files
    npz = deflated_copies(tmp_path / "bomb.npz", [f"x{i}.npy" for i in range(64)], npy_zeros(size))
    from safetensors.torch import save
    package = deflated_copies(tmp_path / "bomb.zip", [f"data/w{i}.bin" for i in range(64)], b"\0" * size,
                              {"model.py": SOURCE, "weights.safetensors": save(Tiny().state_dict())})
    for fn, path in [(sniff_dataset, npz), (sniff_model, package)]:
        assert path.stat().st_size < 1024 * 1024
        err = refused(fn, path, 413, "zip_bomb")
        assert err.details["max_ratio"] == screening.MAX_RATIO and "ZIP_STORED" in err.message


def test_archive_ratio_counts_every_entry(tmp_path):
    """Entries each under RATIO_FREE_BYTES still add up: the archive as a whole may not inflate past MAX_RATIO."""
    path = tmp_path / "many.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(64):
            z.writestr(f"x{i}.npy", b"\0" * (screening.RATIO_FREE_BYTES - 1))
    err = refused(sniff_dataset, path, 413, "zip_bomb")
    assert err.details["entries"] == 64


def test_small_compressible_entries_pass(tmp_path):
    """A package deflated as `zip -r` does: 512 KiB of zeros (1000:1) next to 4 MB of real weights is no bomb."""
    from safetensors.torch import save
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.py", SOURCE)
        z.writestr("weights.safetensors", save({"w": torch.randn(1024, 1024)}))
        z.writestr("README.md", b"\0" * (512 * 1024))
        z.writestr("config.json", b"{}" + b" " * 100_000)
    assert sniff_model(path, **LIMITS).kind == "package"


# ---------------------------------------------------------------------------------------- in a child process

def test_screen_in_child_matches_in_process(pt2, tmp_path):
    got = asyncio.run(screening.screen("model", pt2, **LIMITS, timeout_s=60))
    assert got == sniff_model(pt2, **LIMITS)
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\0" * (16 * 1024 * 1024))
    with pytest.raises(ScreeningError) as info:
        asyncio.run(screening.screen("dataset", path, **LIMITS, timeout_s=60))
    assert (info.value.status, info.value.code) == (413, "zip_bomb") and info.value.details["entry"] == "x.npy"


def test_screen_over_budget_is_killed(tmp_path):
    path = tmp_path / "slow.onnx"
    path.write_bytes(slow_onnx(5_000_000))  # 10 MB: 5 s or more to walk
    start = time.monotonic()
    with pytest.raises(ScreeningError) as info:
        asyncio.run(screening.screen("model", path, **LIMITS, timeout_s=1))
    elapsed = time.monotonic() - start
    assert (info.value.status, info.value.code) == (422, "screening_timeout"), repr(info.value)
    assert "SQUEEZE_SCREENING_TIMEOUT_S" in info.value.message
    assert elapsed < 5, f"the child was not killed on time ({elapsed:.1f} s)"
