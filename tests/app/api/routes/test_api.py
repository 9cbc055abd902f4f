"""The HTTP contract on the real database (SQLite and PostgreSQL), without a worker."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import ADMIN_KEY, new_team_key


def tiny_onnx() -> bytes:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload_model(client, data: bytes, name: str = "m.onnx", headers=None):
    return client.post("/v1/models", params={"name": name}, content=data, headers=headers or {})


def test_auth_required_and_revocation(api):
    assert api.get("/v1/models", headers={"Authorization": ""}).json()["error"]["code"] == "unauthorized"
    r = api.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    created = api.post("/v1/keys", json={"team": "alpha", "name": "ci"}).json()
    assert created["key"].startswith("sqz_") and created["team"] == "alpha"
    user = {"Authorization": f"Bearer {created['key']}"}
    assert api.get("/v1/models", headers=user).status_code == 200
    assert api.post("/v1/keys", json={"team": "x"}, headers=user).status_code == 403
    listed = api.get("/v1/keys").json()
    assert created["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    assert api.delete(f"/v1/keys/{created['id']}").status_code == 204
    assert api.get("/v1/models", headers=user).status_code == 401


def test_keys_stored_hashed(api, configured):
    key = new_team_key(api, "hashy")
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.core.tables import ApiKey

    with session_scope() as db:
        hashes = list(db.scalars(select(ApiKey.key_hash)))
    assert hashlib.sha256(key.encode()).hexdigest() in hashes
    assert key not in hashes and ADMIN_KEY not in hashes


def test_upload_download_etag_range(api):
    data = tiny_onnx()
    r = upload_model(api, data)
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["format"] == "onnx" and model["size_bytes"] == len(data)
    assert model["sha256"] == hashlib.sha256(data).hexdigest()
    d = api.get(model["url"])
    assert d.status_code == 200 and d.content == data and d.headers["etag"] == f'"{model["sha256"]}"'
    assert api.get(model["url"], headers={"If-None-Match": d.headers["etag"]}).status_code == 304
    part = api.get(model["url"], headers={"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == data[2:10]
    # multipart works too and names the model after the file
    r = api.post("/v1/models", files={"file": ("net.onnx", data, "application/octet-stream")})
    assert r.status_code == 201 and r.json()["name"] == "net.onnx"


def test_bad_uploads_leave_nothing(api, configured, tmp_path):
    from app.core.config import get_settings

    assert upload_model(api, b"").status_code == 400
    r = upload_model(api, b"\x80\x04\x95 not a model")
    assert r.status_code == 415 and r.json()["error"]["code"] in ("pickled_model", "unsupported_format")
    assert "onnx" in r.json()["error"]["message"].lower() or ".pt2" in r.json()["error"]["message"]
    assert api.get("/v1/models").json()["data"] == []
    blobs = get_settings().data_dir / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    tmp = get_settings().tmp_dir
    assert not tmp.exists() or not any(tmp.iterdir())


def test_upload_size_limit(api, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 1000)
    r = upload_model(api, tiny_onnx() + b"\0" * 2000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # a chunked body without Content-Length is cut off while streaming
    r = api.post("/v1/models", content=iter([b"\0" * 600, b"\0" * 600]))
    assert r.status_code == 413
    assert not any(get_settings().tmp_dir.iterdir())


def test_job_submit_validation_idempotency_cancel_events(api):
    model = upload_model(api, tiny_onnx()).json()
    bad = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [{"type": "prune",
                                                                                    "sparsity": 1.5}]}})
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["errors"][0]["field"] == "recipe.steps[0].sparsity"
    fmt = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [{"type": "prune",
                   "sparsity": 0.5}], "outputs": ["pt2"]}})
    assert fmt.status_code == 422 and fmt.json()["error"]["details"]["errors"][0]["field"] == "recipe.outputs[0]"
    unknown_preset = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "nope"})
    assert unknown_preset.status_code == 422
    assert api.post("/v1/jobs", json={"model_id": "mdl_nope", "recipe": "prune-50"}).status_code == 404
    assert api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                      "datasets": {"eval": "ds_x"}}).status_code == 404

    body = {"model_id": model["id"], "recipe": "prune-50", "metadata": {"ticket": "ML-1"}}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["status"] == "queued" and job["outputs"] == ["onnx", "safetensors"] and job["metadata"] == {"ticket": "ML-1"}
    assert job["recipe"]["steps"][0]["sparsity"] == 0.5
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    conflict = api.post("/v1/jobs", json={**body, "metadata": {}}, headers={"Idempotency-Key": "k1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"

    canceled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events] == ["queued", "cancel_requested"]
    stream = api.get(f"/v1/jobs/{job['id']}/events", params={"stream": "true"})
    assert "event: queued" in stream.text and "event: end" in stream.text


def test_pagination_and_filters(api):
    model = upload_model(api, tiny_onnx()).json()
    ids = [api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).json()["id"]
           for _ in range(5)]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    seen, after = [], None
    while True:
        page = api.get("/v1/jobs", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["next"]
    assert seen == list(reversed(ids))
    canceled = api.get("/v1/jobs", params={"status": "canceled"}).json()["data"]
    assert [j["id"] for j in canceled] == [ids[0]]
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/v1/jobs", params={"model_id": "mdl_other"}).json()["data"] == []


def test_other_team_sees_404(api):
    model = upload_model(api, tiny_onnx()).json()
    ds = api.post("/v1/datasets", params={"name": "d.npz"},
                  content=npz_bytes(x=np.zeros((2, 4), np.float32))).json()
    job = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).json()
    other = {"Authorization": f"Bearer {new_team_key(api, 'beta')}"}
    for method, path in [("get", f"/v1/models/{model['id']}"), ("get", f"/v1/models/{model['id']}/file"),
                         ("delete", f"/v1/models/{model['id']}"), ("get", f"/v1/datasets/{ds['id']}"),
                         ("get", f"/v1/datasets/{ds['id']}/file"), ("delete", f"/v1/datasets/{ds['id']}"),
                         ("get", f"/v1/jobs/{job['id']}"), ("post", f"/v1/jobs/{job['id']}/cancel"),
                         ("delete", f"/v1/jobs/{job['id']}"),
                         ("get", f"/v1/jobs/{job['id']}/events"), ("get", f"/v1/jobs/{job['id']}/artifacts/x")]:
        r = api.request(method.upper(), path, headers=other)
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["error"]["code"] == "not_found"
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}, headers=other)
    assert r.status_code == 404
    assert api.get("/v1/jobs", headers=other).json()["data"] == []
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # untouched


def test_delete_model(api):
    model = upload_model(api, tiny_onnx()).json()
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert api.get(f"/v1/models/{model['id']}").status_code == 404
    assert api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).status_code == 404


def test_a_deleted_dataset_stays_stored_until_its_last_job_is_deleted(api):
    from app.blobs.store import make_store

    store = make_store()
    model = upload_model(api, tiny_onnx()).json()
    ds = api.post("/v1/datasets", params={"name": "d.npz"},
                  content=npz_bytes(x=np.zeros((2, 4), np.float32))).json()
    job = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50",
                                     "datasets": {"calibration": ds["id"]}}).json()
    assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert store.exists(ds["sha256"])  # the queued job still reads it
    refused = api.delete(f"/v1/jobs/{job['id']}")
    assert refused.status_code == 409 and refused.json()["error"]["details"] == {"status": "queued"}
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not store.exists(ds["sha256"])
    assert store.exists(model["sha256"])  # still listed


def test_recipes_help_and_health(api):
    presets = api.get("/v1/recipes/presets").json()["data"]
    prune = next(p for p in presets if p["name"] == "prune-50")
    assert prune["gives"]["smaller_file"] and not prune["gives"]["faster"]
    assert all(set(p["gives"]) == {"smaller_file", "faster", "formats", "note"} for p in presets)
    assert "steps" in api.get("/v1/recipes/schema").json()["properties"]
    ok = api.post("/v1/recipes/validate", json={"recipe": "prune-50", "model_format": "pt2"}).json()
    assert ok["valid"] and ok["outputs"] == ["pt2", "safetensors"]  # the compact storage is the smaller file
    bad = api.post("/v1/recipes/validate", json={"recipe": {"steps": [], "x": 1}}).json()
    assert not bad["valid"] and {e["field"] for e in bad["errors"]} == {"recipe.steps", "recipe.x"}
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "broker": True}
    assert 'squeeze_jobs{status="queued"}' in api.get("/metrics").text


def test_unknown_route_and_bad_json(api):
    r = api.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"



@pytest.mark.parametrize("guard, field", [
    ({}, "recipe.guard"),  # no bound at all
    ({"min_speedup": 0}, "recipe.guard.min_speedup"),
    ({"max_accuracy_drop": 1.5}, "recipe.guard.max_accuracy_drop"),
    ({"min_speedup": 2, "runtime": "torch"}, "recipe.guard.runtime"),  # an ONNX job times onnxruntime only
    ({"max_accuracy_drop": 0.01}, "recipe.guard.max_accuracy_drop"),  # no eval dataset to measure accuracy on
])
def test_guards_that_cannot_be_checked_are_refused(api, guard, field):
    model = upload_model(api, tiny_onnx()).json()
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [{"type": "prune", "sparsity": 0.5}],
                                                                       "guard": guard}})
    assert r.status_code == 422 and r.json()["error"]["details"]["errors"][0]["field"] == field, r.text


def _package_zip() -> bytes:
    import zipfile

    from safetensors.numpy import save

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.py", "from torch import nn\n\ndef build_model():\n    return nn.Linear(4, 3)\n")
        zf.writestr("weights.safetensors", save({"weight": np.zeros((3, 4), np.float32),
                                                 "bias": np.zeros(3, np.float32)}))
    return buf.getvalue()


@pytest.mark.parametrize("recipe, fmt, field", [
    ({"steps": [{"type": "prune", "sparsity": 1.0}]}, "onnx", "recipe.steps[0].sparsity"),
    ({"steps": [{"type": "prune", "sparsity": -0.1}]}, "onnx", "recipe.steps[0].sparsity"),
    ({"steps": [{"type": "prune", "pattern": "2:4", "sparsity": 0.3}]}, "onnx", "recipe.steps[0]"),
    ({"steps": [{"type": "prune", "pattern": "3:7"}]}, "onnx", "recipe.steps[0].pattern"),
    ({"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}]}, "onnx", "recipe.steps[0]"),
    ({"steps": [{"type": "finetune"}]}, "onnx", "recipe.steps[0]"),
    ({"steps": [{"type": "cluster", "clusters": 257}]}, "onnx", "recipe.steps[0].clusters"),
    ({"steps": [{"type": "cluster", "clusters": 1}]}, "onnx", "recipe.steps[0].clusters"),
    ({"steps": [{"type": "quantize", "method": "weight_int4"}]}, "onnx", "recipe.steps[0].method"),
    ({"steps": [{"type": "distill", "teacher": "../etc"}]}, "package", "recipe.steps[0].teacher"),
    ({"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}], "outputs": ["package"]}, "package",
     "recipe.outputs[0]"),
    ({"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}], "outputs": ["onnx", "safetensors"]},
     "package", "recipe.outputs[1]"),
])
def test_compression_recipes_refused_at_submit(api, recipe, fmt, field):
    data = tiny_onnx() if fmt == "onnx" else _package_zip()
    model = upload_model(api, data, name=f"m.{'onnx' if fmt == 'onnx' else 'zip'}").json()
    assert model["format"] == fmt
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe})
    assert r.status_code == 422, r.text
    fields = [e["field"] for e in r.json()["error"]["details"]["errors"]]
    assert field in fields, fields


def test_channel_prune_on_package_defaults_to_graph_outputs(api):
    model = upload_model(api, _package_zip(), name="m.zip").json()
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "slim-50"})
    assert r.status_code == 202 and r.json()["outputs"] == ["pt2", "onnx"]
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [
        {"type": "prune", "method": "channel", "sparsity": 0.5}]}})
    assert r.status_code == 202 and r.json()["outputs"] == ["pt2", "onnx"]
    r = api.post("/v1/jobs", json={"model_id": model["id"], "recipe": "palette-16"})
    assert r.status_code == 202 and r.json()["outputs"] == ["safetensors"]
