"""Hostile input, through HTTP: each is refused (or contained) with a clear status and code, and nothing is stored.

tests/app/files/test_screening.py checks the screening functions file by file; this catalogue sends the same kinds of
attack through the API (status, code, no row, no blob, no temp file left) and adds what only HTTP has: declared
sizes, names, content types, and every recipe bound generated from the pydantic schema. Payloads that would run
code create a canary file (/tmp/squeeze-pwned-<random>); no test may see it appear.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import secrets
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.app.api.routes.test_api import npz_bytes, tiny_onnx, upload_model

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

CANARY = Path(f"/tmp/squeeze-pwned-{secrets.token_hex(8)}")


class OsSystem:
    def __reduce__(self):
        return (os.system, (f"touch {CANARY}",))


class BuiltinsEval:
    def __reduce__(self):
        return (eval, (f"open({str(CANARY)!r}, 'w')",))


@pytest.fixture(autouse=True)
def canary():
    yield
    assert not CANARY.exists(), f"a hostile payload ran: {CANARY} exists"


# ------------------------------------------------------------------------------------------------ builders

class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(scope="module")
def pt2() -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(2, 4),)), buf)
    return buf.getvalue()


def _rezip(src: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """A copy of a zip with entries replaced (matched by name suffix) or added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return out.getvalue()


def _member(src: bytes, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(src)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def pt2_with_pickle_in_data_pkl(pt2: bytes, payload) -> bytes:
    """The sample inputs of a .pt2 are a torch.save zip; its data.pkl gets the payload (torch.export.load would
    unpickle it)."""
    inner = _member(pt2, "data/sample_inputs/model.pt")
    return _rezip(pt2, replace={"data/sample_inputs/model.pt": _rezip(inner, replace={
        "data.pkl": pickle.dumps(payload, protocol=2)})})


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return out.getvalue()


def _safetensors() -> bytes:
    from safetensors.numpy import save

    return save({"weight": np.zeros((3, 4), np.float32), "bias": np.zeros(3, np.float32)})


def package(extra: dict[str, bytes] | None = None, **kw) -> bytes:
    return _zip({"model.py": b"from torch import nn\n\ndef build_model():\n    return nn.Linear(4, 3)\n",
                 "weights.safetensors": _safetensors(), **(extra or {})}, **kw)


def hf(extra: dict[str, bytes] | None = None) -> bytes:
    return _zip({"config.json": json.dumps({"model_type": "bert", "architectures": ["BertModel"]}).encode(),
                 "model.safetensors": _safetensors(), **(extra or {})})


def with_symlink(src: bytes, name: str, target: str) -> bytes:
    out = io.BytesIO(src)
    with zipfile.ZipFile(out, "a") as z:
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        z.writestr(info, target)
    return out.getvalue()


def onnx_external(location: str) -> bytes:
    from onnx import TensorProto, helper

    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 3])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def zip_bomb() -> bytes:
    # 64 MiB of zeros deflate to ~64 KiB: the declared sizes give the bomb away before anything is inflated
    return package({"weights.safetensors": b"\0" * (64 * 1024 * 1024)}, compression=zipfile.ZIP_DEFLATED)


# (id, resource, builder(pt2) -> bytes, status, code)
CATALOGUE = [
    ("pickle-os-system", "models", lambda _: pickle.dumps(OsSystem(), protocol=4), 415, "pickled_model"),
    ("pickle-builtins-eval", "models", lambda _: pickle.dumps(BuiltinsEval(), protocol=2), 415, "pickled_model"),
    ("pt2-data.pkl-os-system", "models", lambda p: pt2_with_pickle_in_data_pkl(p, OsSystem()), 415, "unsafe_pickle"),
    ("pt2-data.pkl-builtins-eval", "models", lambda p: pt2_with_pickle_in_data_pkl(p, BuiltinsEval()), 415,
     "unsafe_pickle"),
    ("pt2-raw-pickle-entry", "models",
     lambda p: _rezip(p, replace={"data/sample_inputs/model.pt": pickle.dumps(BuiltinsEval(), protocol=2)}), 415,
     "unsafe_pickle"),
    ("torch.save-zip", "models", lambda _: _torch_save_zip(), 415, "pickled_model"),
    ("pickled-dataset", "datasets", lambda _: pickle.dumps(BuiltinsEval(), protocol=4), 415, "unsafe_pickle"),
    ("npz-object-array", "datasets", lambda _: npz_bytes(x=np.array([OsSystem()], dtype=object)), 415,
     "unsafe_pickle"),
    ("zip-bomb-package", "models", lambda _: zip_bomb(), 413, "zip_bomb"),
    ("zip-bomb-npz", "datasets",
     lambda _: _zip({"x.npy": _npy_header((64 * 1024 * 1024,)) + b"\0" * (64 * 1024 * 1024)}, zipfile.ZIP_DEFLATED),
     413, "zip_bomb"),
    ("package-dotdot", "models", lambda _: package({"../x.py": b"x"}), 415, "path_traversal"),
    ("package-absolute", "models", lambda _: package({"/etc/cron.d/x": b"x"}), 415, "path_traversal"),
    ("package-symlink", "models", lambda _: with_symlink(package(), "data.bin", "/etc/passwd"), 415,
     "path_traversal"),
    ("hf-dotdot", "models", lambda _: hf({"../../x.json": b"{}"}), 415, "path_traversal"),
    ("hf-absolute", "models", lambda _: hf({"/tmp/x.json": b"{}"}), 415, "path_traversal"),
    ("hf-symlink", "models", lambda _: with_symlink(hf(), "tokenizer.json", "/etc/shadow"), 415, "path_traversal"),
    ("pt2-dotdot", "models", lambda p: _rezip(p, add={"../evil.py": b"x"}), 415, "path_traversal"),
    ("pt2-symlink", "models", lambda p: with_symlink(p, "tiny/extra", "/etc/passwd"), 415, "path_traversal"),
    ("pt2-truncated", "models", lambda p: p[: len(p) // 2], 422, "truncated"),
    ("onnx-truncated", "models", lambda _: tiny_onnx()[:-20], 422, "truncated"),
    ("npz-truncated", "datasets", lambda _: npz_bytes(x=np.zeros((64, 4), np.float32))[:-100], 422, "truncated"),
    ("onnx-external-dotdot", "models", lambda _: onnx_external("../../etc/passwd"), 415, "external_data"),
    ("onnx-external-absolute", "models", lambda _: onnx_external("/etc/shadow"), 415, "external_data"),
    ("random-bytes", "models", lambda _: secrets.token_bytes(4096), 415, "unsupported_format"),
]


def _torch_save_zip() -> bytes:
    buf = io.BytesIO()
    torch.save(_Tiny().state_dict(), buf)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def assert_nothing_stored(api) -> None:
    from app.core.config import get_settings

    assert api.get("/v1/models").json()["data"] == [] and api.get("/v1/datasets").json()["data"] == []
    blobs = get_settings().data_dir / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    tmp = get_settings().tmp_dir
    assert not tmp.exists() or not any(tmp.iterdir())


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_hostile_upload_refused_and_nothing_stored(api, pt2, case):
    _, resource, build, status, code = case
    r = api.post(f"/v1/{resource}", params={"name": "upload.bin"}, content=build(pt2))
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert r.json()["error"]["message"]
    # the same bytes as a multipart upload get the same answer
    r = api.post(f"/v1/{resource}", files={"file": ("upload.bin", build(pt2), "application/octet-stream")})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert_nothing_stored(api)


def test_pickles_say_what_to_upload_instead(api):
    r = api.post("/v1/models", content=pickle.dumps(OsSystem()))
    message = r.json()["error"]["message"]
    assert ".pt2" in message and "onnx" in message.lower()


# ------------------------------------------------------------------------------------------------ sizes

@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("path, limit_setting", [("/v1/models", "max_upload_bytes"),
                                                 ("/v1/datasets", "max_upload_bytes"),
                                                 ("/v1/jobs", "max_body_bytes"),
                                                 ("/v1/recipes/validate", "max_body_bytes")])
def test_declared_size_over_the_limit_is_413_before_reading(api, monkeypatch, path, limit_setting):
    """Straight at the ASGI app: the body is never asked for when Content-Length already says too much."""
    from app.core.config import get_settings
    from tests.conftest import ADMIN_KEY

    monkeypatch.setattr(get_settings(), limit_setting, 10_000)
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"\0" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("testserver", 80), "client": ("127.0.0.1", 1234),
             "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {ADMIN_KEY}".encode()),
                         (b"content-type", b"application/octet-stream" if "jobs" not in path and "recipes" not in path
                          else b"application/json"),
                         (b"content-length", str(50 * 1024**3).encode())]}
    asyncio.run(api.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert reads == [], "the body was read"
    assert_nothing_stored(api)


# ------------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_names_unicode_and_length(api):
    data = tiny_onnx()
    for name in ["модель-量子化-🗜️.onnx", "x" * 255, "é" * 255, "🗜" * 255]:
        r = upload_model(api, data, name=name)
        assert r.status_code == 201 and r.json()["name"] == name, (name, r.text)
    for name in ["x" * 256, "🗜" * 256]:
        r = upload_model(api, data, name=name)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"]["errors"][0]["field"] == "name"
    # names are labels, never paths, and carry no control or bidi-override characters
    cleaned = {"../../etc/passwd": "passwd", "C:\\Windows\\x.onnx": "x.onnx", "a\x00b\nc\u202e.onnx": "abc.onnx",
               "   ": "model.onnx", "\u202e": "model.onnx"}
    for given, stored in cleaned.items():
        r = upload_model(api, data, name=given)
        assert r.status_code == 201 and r.json()["name"] == stored, (given, r.text)
    # the Content-Disposition of a download is escaped whatever the name
    model = upload_model(api, data, name='q"uote;\r\nX-Evil: 1.onnx').json()
    d = api.get(model["url"])
    assert d.status_code == 200 and "x-evil" not in d.headers


# ------------------------------------------------------------------------------------------------ content types

@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_wrong_content_types(api):
    model = upload_model(api, tiny_onnx()).json()
    body = json.dumps({"model_id": model["id"], "recipe": "prune-50"}).encode()
    for ctype in ["text/plain", "application/x-www-form-urlencoded", "application/xml", "image/png"]:
        r = api.post("/v1/jobs", content=body, headers={"Content-Type": ctype})
        code = r.json()["error"]["code"]
        assert r.status_code in (415, 422) and code in ("invalid_request", "unsupported_media_type"), (ctype, r.text)
    r = api.post("/v1/jobs", files={"file": ("x.json", body, "application/json")})
    assert r.status_code == 422, r.text
    # a multipart upload without a boundary, or without its `file` field
    r = api.post("/v1/models", content=tiny_onnx(), headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = api.post("/v1/models", files={"other": ("m.onnx", tiny_onnx(), "application/octet-stream")})
    assert r.status_code == 400 and "file" in r.json()["error"]["message"]
    assert api.get("/v1/jobs").json()["data"] == []
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == [model["id"]]


# ------------------------------------------------------------------------------------------------ recipe bounds

def _bounds():
    """(where, field, value, accepted) for every numeric bound in the recipe schema, read from pydantic's JSON
    schema: at an inclusive bound accepted, one step past it refused; at an exclusive bound refused, just inside it
    accepted."""
    from app.recipes import STEP_SPECS, EvaluateSpec, GuardSpec, TextSpec

    base = {"PruneSpec": {"type": "prune", "sparsity": 0.5}, "ChannelPruneSpec": {"type": "prune", "method": "channel",
                                                                  "sparsity": 0.5},
            "ClusterSpec": {"type": "cluster"}, "FinetuneSpec": {"type": "finetune"},
            "DistillSpec": {"type": "distill"}, "QuantizeSpec": {"type": "quantize"}}
    specs = [(spec.__name__, spec) for spec in STEP_SPECS] + [("evaluate", EvaluateSpec), ("guard", GuardSpec),
                                                               ("text", TextSpec)]
    out = []
    for where, spec in specs:
        for field, prop in spec.model_json_schema()["properties"].items():
            options = prop.get("anyOf", [prop])
            numeric = next((o for o in options if o.get("type") in ("integer", "number")), None)
            if numeric is None:
                items = prop.get("items") or {}
                if items.get("type") in ("integer", "number"):  # e.g. evaluate.batch_sizes: bound each item
                    numeric = {**items, "_list": True}
                else:
                    continue
            integer = numeric["type"] == "integer"
            step = 1 if integer else max(abs(numeric.get("minimum", numeric.get("maximum", 1))) * 1e-6, 1e-9)
            for key, sign in (("minimum", -1), ("maximum", 1), ("exclusiveMinimum", -1), ("exclusiveMaximum", 1)):
                if key not in numeric:
                    continue
                bound = numeric[key]
                inclusive = not key.startswith("exclusive")
                for value, ok in ((bound, inclusive), (bound + sign * step, False) if inclusive
                                  else (bound - sign * step, True)):
                    if integer:
                        value = int(value)
                    out.append((where, field, [value] if numeric.get("_list") else value, ok, base.get(where)))
    return out


BOUNDS = _bounds()


def test_the_bounds_cover_every_numeric_field():
    fields = {(w, f) for w, f, *_ in BOUNDS}
    assert ("PruneSpec", "sparsity") in fields and ("ClusterSpec", "clusters") in fields
    assert ("DistillSpec", "temperature") in fields and ("evaluate", "batch_sizes") in fields
    assert ("guard", "min_speedup") in fields and ("QuantizeSpec", "samples") in fields
    assert ("text", "seq_len") in fields and ("guard", "max_perplexity_increase") in fields
    assert len(BOUNDS) >= 60, len(BOUNDS)


# Cross-field rules that would refuse a lone in-bound value for another reason: give them what they need.
COMPANIONS = {("ChannelPruneSpec", "sparsity"): {"heads": 0.5}, ("guard", "batch_size"): {"min_speedup": 2.0},
              ("QuantizeSpec", "bits_budget"): {"method": "weight_int4"}}


def _recipe(where, field, value, base) -> tuple[dict, str]:
    path = f"{field}[0]" if isinstance(value, list) else field
    extra = COMPANIONS.get((where, field), {})
    if base is not None:
        return {"steps": [{**base, **extra, field: value}]}, f"recipe.steps[0].{path}"
    recipe = {"steps": [{"type": "prune", "sparsity": 0.5}], where: {**extra, field: value}}
    return recipe, f"recipe.{where}.{path}"


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_recipe_bounds_at_and_past_every_limit(api):
    """At a bound: the recipe validates. Past it: POST /v1/jobs is a 422 naming the field, and no job exists."""
    model = upload_model(api, tiny_onnx()).json()
    failures = []
    for where, field, value, ok, base in BOUNDS:
        recipe, path = _recipe(where, field, value, base)
        if ok:
            r = api.post("/v1/recipes/validate", json={"recipe": recipe})
            if not (r.status_code == 200 and r.json()["valid"]):
                failures.append((where, field, value, "in bounds but refused", r.json().get("errors")))
        else:
            r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe})
            errors = r.json()["error"]["details"].get("errors", []) if r.status_code == 422 else []
            fields = [e["field"] for e in errors]
            if r.status_code != 422 or path not in fields:
                failures.append((where, field, value, r.status_code, fields or r.text[:200]))
    assert not failures, "\n".join(map(repr, failures))
    assert api.get("/v1/jobs").json()["data"] == []
