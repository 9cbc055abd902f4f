"""An ONNX model's input tensors, read from the graph's ValueInfoProtos at the wire level (no onnx package):
graph inputs that are not initializers, each with its elem_type and shape (dim_value, or dim_param when symbolic)."""

from __future__ import annotations

from itertools import islice
from typing import Any

from app.files.screening.common import MAX_DETAIL_ITEMS
from app.files.screening.inputs import MAX_NAME_CHARS, inputs_details, tensor_input
from app.files.screening.protobuf import WireError, fields, signed64, text

# onnx TensorProto.DataType, in torch's dtype names.
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
              9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
              16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz",
              21: "uint4", 22: "int4", 23: "float4_e2m1", 24: "float8_e8m0"}
ONNX_ADVICE = ('torch.onnx.export(model, (x,), path, dynamic_shapes={"x": {0: torch.export.Dim("batch")}}) '
               '(or dynamic_axes={"x": {0: "batch"}} with dynamo=False)')
MAX_DIMS = 64  # past this a shape is cut, its last dim "..."
MAX_GRAPH_INPUTS = 10_000  # graph inputs looked at; initializers listed as inputs (IR < 4) count here too

# Field numbers: GraphProto.input 11, .initializer 5; ValueInfoProto.name 1, .type 2; TypeProto.tensor_type 1;
# TypeProto.Tensor.elem_type 1, .shape 2; TensorShapeProto.dim 1; Dimension.dim_value 1, .dim_param 2;
# TensorProto.name 8.


def _name(buf: Any, span: tuple[int, int], field: int) -> str | None:
    for fnum, wt, val in fields(buf, *span):
        if fnum == field and wt == 2:
            return text(buf, val, MAX_NAME_CHARS)
    return None


def _submessage(buf: Any, span: tuple[int, int], field: int) -> tuple[int, int] | None:
    found = None
    for fnum, wt, val in fields(buf, *span):
        if fnum == field and wt == 2:
            found = val  # protobuf merges repeated submessages; the last one is enough here
    return found


def _dim(buf: Any, span: tuple[int, int]) -> int | str:
    dim: int | str = "?"
    for fnum, wt, val in fields(buf, *span):
        if fnum == 1 and wt == 0:
            dim = signed64(val)
        elif fnum == 2 and wt == 2:
            dim = text(buf, val, MAX_NAME_CHARS)
    return dim


def _tensor_type(buf: Any, span: tuple[int, int]) -> tuple[str | None, list[int | str]]:
    dtype: str | None = None
    shape: list[int | str] = []
    for fnum, wt, val in fields(buf, *span):
        if fnum == 1 and wt == 0:
            dtype = ELEM_TYPES.get(val, f"elem_type_{val}")
        elif fnum == 2 and wt == 2:
            dims = (d for f2, w2, d in fields(buf, *val) if f2 == 1 and w2 == 2)
            shape = [_dim(buf, d) for d in islice(dims, MAX_DIMS + 1)]
    if len(shape) > MAX_DIMS:
        shape[MAX_DIMS:] = ["..."]
    return dtype, shape


def _graph_inputs(buf: Any, graph: tuple[int, int]) -> list[dict[str, Any]]:
    spans = islice((val for fnum, wt, val in fields(buf, *graph) if fnum == 11 and wt == 2), MAX_GRAPH_INPUTS)
    named = [(_name(buf, span, 1), span) for span in spans]
    wanted = {name for name, _ in named}
    initializers = {name for fnum, wt, val in fields(buf, *graph) if fnum == 5 and wt == 2
                    for name in [_name(buf, val, 8)] if name in wanted}
    inputs = []
    for name, span in named:
        type_span = _submessage(buf, span, 2)
        tensor = _submessage(buf, type_span, 1) if type_span else None
        if name in initializers or tensor is None:
            continue  # a weight listed as an input, or an input that is not a tensor (a sequence, a map)
        inputs.append(tensor_input(name or "?", *_tensor_type(buf, tensor)))
        if len(inputs) == MAX_DETAIL_ITEMS:
            break
    return inputs


def onnx_inputs(buf: Any, graph: tuple[int, int]) -> dict[str, Any]:
    """The graph's inputs as details; none when its ValueInfoProtos do not parse (the model is screened all the
    same: ONNX Runtime refuses such a file when it loads it)."""
    try:
        inputs = _graph_inputs(buf, graph)
    except WireError:
        return {}
    return inputs_details(inputs, ONNX_ADVICE)
