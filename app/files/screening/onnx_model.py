"""ONNX models, walked at the protobuf wire level: the ModelProto's fields, every TensorProto wherever it nests (no
external data), the opsets, and the graph's inputs."""

from __future__ import annotations

from typing import Any

from app.files.screening.common import ScreeningError, Sniffed, truncated
from app.files.screening.onnx_inputs import onnx_inputs
from app.files.screening.protobuf import WireError, fields, text

MAX_PROTO_DEPTH = 64
# ModelProto: field -> wire type.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
# Where TensorProtos can hide inside a model: message -> {field: submessage}.
_NESTED = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _refuse_external(msg: str, fnum: int, wt: int, val: Any) -> None:
    if msg == "tensor" and ((fnum == 13 and wt == 2) or (fnum == 14 and wt == 0 and val == 1)):
        raise ScreeningError(
            415, "external_data",
            "ONNX model references external data files; upload a single self-contained file "
            "(torch.onnx.export(..., external_data=False), or onnx.save_model(m, path, "
            "save_as_external_data=False))", {})


def _walk_onnx(buf: Any, start: int, end: int, msg: str, depth: int, stats: dict[str, int]) -> None:
    if depth > MAX_PROTO_DEPTH:
        raise WireError("invalid", "messages nested too deep")
    nested = _NESTED.get(msg, {})
    for fnum, wt, val in fields(buf, start, end):
        _refuse_external(msg, fnum, wt, val)
        sub = nested.get(fnum)
        if sub is None:
            continue
        if wt != 2:
            raise WireError("invalid", f"{msg} field {fnum} has wire type {wt}")
        if sub == "tensor":
            stats["tensors"] += 1
        elif sub == "node":
            stats["nodes"] += 1
        _walk_onnx(buf, val[0], val[1], sub, depth + 1, stats)


def _opset(buf: Any, span: tuple[int, int]) -> tuple[str, int]:
    domain, version = "", 0
    for fnum, wt, val in fields(buf, *span):
        if fnum == 1 and wt == 2:
            domain = bytes(buf[val[0]:val[1]]).decode("utf-8", "replace")
        elif fnum == 2 and wt == 0:
            version = val
    return domain or "ai.onnx", version


def _walk_model(buf: Any, size: int, details: dict[str, Any]) -> tuple[int, int] | None:
    """Walks the ModelProto into details (producer, opsets, counts); returns the graph's span."""
    graph: tuple[int, int] | None = None
    opsets: dict[str, int] = {}
    stats = {"nodes": 0, "tensors": 0}
    for fnum, wt, val in fields(buf, 0, size):
        if _MODEL_FIELDS.get(fnum) != wt:
            raise WireError("invalid", f"ModelProto has no field {fnum} with wire type {wt}")
        if fnum == 7:
            graph = val
        elif fnum == 8:
            domain, version = _opset(buf, val)
            opsets[domain] = version
        elif fnum == 2:
            details["producer_name"] = text(buf, val, 200)
        if fnum in _NESTED["model"]:
            _walk_onnx(buf, val[0], val[1], _NESTED["model"][fnum], 1, stats)
    details.update(opset_import=opsets, nodes=stats["nodes"], tensors=stats["tensors"])
    return graph


def sniff_onnx(buf: Any, size: int) -> Sniffed | None:
    """Returns None when the bytes do not look like ONNX at all; raises when they look like broken ONNX."""
    try:
        first = next(fields(buf, 0, size), None)
    except WireError:
        return None
    # Every ONNX writer puts ir_version (field 1, varint) first.
    if first is None or first[0] != 1 or first[1] != 0 or not 1 <= first[2] <= 100:
        return None
    details: dict[str, Any] = {"ir_version": first[2]}
    try:
        graph = _walk_model(buf, size, details)
    except WireError as exc:
        if exc.kind == "truncated":
            raise truncated("ONNX model", reason=str(exc)) from None
        raise ScreeningError(422, "invalid_onnx", f"not a valid ONNX model ({exc})", {}) from None
    if graph is None:
        raise ScreeningError(422, "invalid_onnx", "ONNX model has no graph (truncated upload?)", {})
    details.update(onnx_inputs(buf, graph))
    return Sniffed("onnx", details)
