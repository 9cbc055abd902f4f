"""A .pt2's input tensors, read from the exported program's JSON (models/<name>.json: graph_module.signature's
user inputs and graph.tensor_values' metas), never by loading it."""

from __future__ import annotations

import json
import re
import zipfile
from typing import Any

from app.files.screening.common import MAX_JSON_BYTES
from app.files.screening.inputs import inputs_details, tensor_input

# torch/_export/serde/schema.py ScalarType, in torch's own dtype names.
SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
                9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16",
                29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz",
                33: "float8_e8m0fnu", 34: "uint32", 35: "uint64"}
PT2_ADVICE = ('torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}), '
              "then torch.export.save")
_SYMBOL = re.compile(r"^Symbol\('([^']{1,100})'")
MAX_EXPR_CHARS = 100


def _dim(size: Any) -> int | str:
    if not isinstance(size, dict):
        return "?"
    if isinstance(size.get("as_int"), int):
        return size["as_int"]
    expr = (size.get("as_expr") or {}).get("expr_str")
    if not isinstance(expr, str):
        return "?"
    symbol = _SYMBOL.match(expr)
    return symbol.group(1) if symbol else expr[:MAX_EXPR_CHARS]


def _user_tensors(program: dict[str, Any]) -> list[dict[str, Any]]:
    graph_module = program["graph_module"]
    metas = graph_module["graph"]["tensor_values"]
    inputs = []
    for spec in graph_module["signature"]["input_specs"]:
        arg = (spec.get("user_input") or {}).get("arg") or {}
        if "as_tensor" not in arg:
            continue  # parameters, buffers, constants; a user input that is not a tensor (an int, a bool)
        name = arg["as_tensor"]["name"]
        meta = metas[name]
        inputs.append(tensor_input(name, SCALAR_TYPES.get(meta["dtype"]), [_dim(s) for s in meta["sizes"]]))
    return inputs


def pt2_inputs(zf: zipfile.ZipFile, root: str, models: list[str]) -> dict[str, Any]:
    """The default model's inputs (`model`, the one torch.export.load returns, else the first), as details; none
    when its program is too large or not in the layout this reads (the archive is screened all the same)."""
    entry = f"{root}/models/{'model' if 'model' in models else models[0]}.json"
    if zf.getinfo(entry).file_size > MAX_JSON_BYTES:
        return {}
    try:
        inputs = _user_tensors(json.loads(zf.read(entry)))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError,
            zipfile.BadZipFile, EOFError, OSError):
        return {}
    return inputs_details(inputs, PT2_ADVICE)
