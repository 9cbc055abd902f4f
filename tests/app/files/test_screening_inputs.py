"""The input shapes screening reads at upload (`details.inputs`, and a `fixed_batch` warning), from real .pt2 and
ONNX files made here with torch.export / torch.onnx.export, through HTTP; odd and hostile graphs through
sniff_model."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.files.screening import sniff_model
from app.files.screening.inputs import MAX_NAME_CHARS
from app.files.screening.onnx_inputs import MAX_DIMS
from tests.app.api.routes.test_api import upload_model

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

LIMITS = dict(max_unpacked_bytes=1 << 34, max_entries=10_000)
FEATURES = 6


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(FEATURES, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


def _batch(dynamic: bool) -> dict:
    return {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}} if dynamic else {}


def _pt2(path: Path, dynamic: bool) -> Path:
    x = torch.randn(3 if dynamic else 1, FEATURES)
    torch.export.save(torch.export.export(Head().eval(), (x,), **_batch(dynamic)), path)
    return path


def _onnx(path: Path, dynamic: bool) -> Path:
    x = torch.randn(3 if dynamic else 1, FEATURES)
    torch.onnx.export(Head().eval(), (x,), str(path), dynamo=True, external_data=False, **_batch(dynamic))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    return {f"{kind}-{mode}": make(folder / f"{kind}-{mode}.{kind}", mode == "dynamic")
            for kind, make in (("pt2", _pt2), ("onnx", _onnx)) for mode in ("static", "dynamic")}


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_upload_reports_input_shapes(api, files):
    details = {}
    for key, path in files.items():
        r = upload_model(api, path.read_bytes(), name=path.name)
        assert r.status_code == 201, r.text
        assert r.json()["format"] == key.split("-")[0]
        details[key] = r.json()["details"]
        assert api.get(f"/v1/models/{r.json()['id']}").json()["details"] == details[key]  # as stored
    for kind in ("pt2", "onnx"):
        static, dynamic = details[f"{kind}-static"], details[f"{kind}-dynamic"]
        assert static["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, FEATURES]}], static
        [warning] = static["warnings"]
        assert warning.startswith("fixed_batch: the model's batch is fixed at 1"), warning
        assert "export with a dynamic batch" in warning and 'torch.export.Dim("batch")' in warning
        [x] = dynamic["inputs"]
        assert (x["name"], x["dtype"], x["shape"][1]) == ("x", "float32", FEATURES), dynamic
        assert isinstance(x["shape"][0], str) and x["shape"][0], dynamic
        assert "warnings" not in dynamic
    # ONNX keeps the exporter's name for the dim; torch.export names its symbol itself (s0, s77, ...)
    assert details["onnx-dynamic"]["inputs"][0]["shape"][0] == "batch"


def test_pt2_inputs_of_several_tensors_and_dtypes(tmp_path):
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return x * ids.sum()

    path = tmp_path / "two.pt2"
    args = (torch.randn(4, 3, 5), torch.ones(4, 7, dtype=torch.int64))
    torch.export.save(torch.export.export(Two(), args, dynamic_shapes={"x": {0: torch.export.Dim("b")},
                                                                       "ids": {0: torch.export.Dim("b")}}), path)
    inputs = sniff_model(path, **LIMITS).details["inputs"]
    assert [(i["name"], i["dtype"], i["shape"][1:]) for i in inputs] == [("x", "float32", [3, 5]),
                                                                          ("ids", "int64", [7])]
    assert inputs[0]["shape"][0] == inputs[1]["shape"][0] and isinstance(inputs[0]["shape"][0], str)


def _rewrite(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename.endswith(suffix) else zin.read(info))
    dst.write_bytes(buf.getvalue())
    return dst


@pytest.mark.parametrize("program", [b'{"graph_module": {}}', b"[1, 2]", b"[" * 100_000, b"\xff not json"])
def test_pt2_program_in_another_layout_is_screened_without_inputs(files, tmp_path, program):
    """The program's JSON is read for its inputs only: in a layout this does not read, the archive is screened
    (and accepted) all the same, with no `inputs`."""
    path = _rewrite(files["pt2-static"], tmp_path / "other.pt2", "models/model.json", program)
    got = sniff_model(path, **LIMITS)
    assert got.kind == "pt2" and "inputs" not in got.details and "warnings" not in got.details


def test_onnx_inputs_skip_initializers_and_non_tensors(tmp_path):
    """Weights listed as graph inputs (IR < 4 exports) and inputs that are not tensors are not reported; an unnamed
    dim reads "?", a very long shape is cut, a scalar input does not make the batch fixed."""
    from onnx import TensorProto, helper, numpy_helper

    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, "width"]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT16, [2]),
         helper.make_tensor_value_info("scale", TensorProto.INT64, []),
         helper.make_tensor_value_info("wide", TensorProto.BOOL, [1] * (MAX_DIMS + 10)),
         helper.make_tensor_value_info("n" * (MAX_NAME_CHARS + 50), TensorProto.UINT8, [8]),
         seq],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 2])],
        [numpy_helper.from_array(np.ones(2, np.float16), "w")])
    path = tmp_path / "odd.onnx"
    onnx.save_model(helper.make_model(graph, ir_version=3, opset_imports=[helper.make_opsetid("", 9)]), str(path))
    details = sniff_model(path, **LIMITS).details
    assert details["inputs"] == [
        {"name": "x", "dtype": "float16", "shape": ["?", "width"]},
        {"name": "scale", "dtype": "int64", "shape": []},
        {"name": "wide", "dtype": "bool", "shape": [1] * MAX_DIMS + ["..."]},
        {"name": "n" * MAX_NAME_CHARS, "dtype": "uint8", "shape": [8]},
    ]
    assert "warnings" not in details  # x's batch is not fixed


def test_onnx_fixed_batch_other_than_one(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3])])
    path = tmp_path / "b8.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    [warning] = sniff_model(path, **LIMITS).details["warnings"]
    assert warning.startswith("fixed_batch: the model's batch is fixed at 8 (input 'x' has shape [8, 3])")


def test_onnx_input_value_info_that_does_not_parse(files, tmp_path):
    """Garbage inside a graph input's ValueInfoProto (the screening walk does not enter it): the model is screened as
    before, without `inputs`."""
    model = onnx.load(str(files["onnx-static"]))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "\u00e9"  # placeholder of the same length...
    raw = model.SerializeToString()
    at = raw.index("\u00e9".encode())
    broken = raw[:at - 2] + b"\x17" + raw[at - 1:]  # ...whose Dimension field key becomes wire type 7 (invalid)
    path = tmp_path / "broken.onnx"
    path.write_bytes(broken)
    details = sniff_model(path, **LIMITS).details
    assert "inputs" not in details and details["nodes"] > 0
