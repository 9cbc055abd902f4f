"""The client package (client/, squeeze_client) against the real app in-process (TestClient is an httpx.Client) on
the real database, no worker."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from squeeze_client import (
    Client,
    Conflict,
    EventOut,
    Invalid,
    NotFound,
    TooLarge,
    Unauthorized,
    Unreachable,
    Unsupported,
    WaitTimeout,
    client_config,
    verify_webhook,
)
from squeeze_client import client as client_module

from tests.app.api.routes.test_api import npz_bytes, tiny_onnx
from tests.conftest import new_team_key


@pytest.fixture
def sq(api) -> Client:
    """A client with a fresh team's key, through the in-process app."""
    return Client(http=api, api_key=new_team_key(api, "client-team"))


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_onnx())
    return path


class ReadOnly:
    """A stream with no size and no fileno (a pipe, a socket): uploaded chunked."""

    def __init__(self, data: bytes):
        self.data, self.reads = data, 0

    def read(self, n: int) -> bytes:
        self.reads += 1
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def test_config_precedence_explicit_then_env_then_file(tmp_path, monkeypatch):
    for k in ("SQUEEZE_URL", "SQUEEZE_API_KEY", "SQUEEZE_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    cfg = client_config()
    assert (cfg.url, cfg.api_key, cfg.config_file) == ("http://127.0.0.1:8000", None, None)

    (tmp_path / "squeeze").mkdir()
    (tmp_path / "squeeze" / "config.json").write_text(json.dumps({"url": "http://json:1", "api_key": "k-json"}))
    assert client_config().url == "http://json:1"
    (tmp_path / "squeeze" / "config.toml").write_text('url = "http://file:1/"\napi_key = "k-file"\n')
    cfg = client_config()  # TOML before JSON; a trailing slash dropped
    assert (cfg.url, cfg.api_key, cfg.config_file) == ("http://file:1", "k-file", tmp_path / "squeeze/config.toml")

    monkeypatch.setenv("SQUEEZE_URL", "http://env:2")
    assert (client_config().url, client_config().api_key) == ("http://env:2", "k-file")
    monkeypatch.setenv("SQUEEZE_API_KEY", "k-env")
    assert client_config().api_key == "k-env"
    cfg = client_config("http://arg:3", "k-arg")
    assert (cfg.url, cfg.api_key) == ("http://arg:3", "k-arg")

    monkeypatch.setenv("SQUEEZE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="not a file"):
        client_config()
    bad = tmp_path / "bad.toml"
    bad.write_text("url = ")
    monkeypatch.setenv("SQUEEZE_CONFIG", str(bad))
    with pytest.raises(ValueError, match="not valid TOML"):
        client_config()


def test_models_and_datasets_upload_list_show_download_delete(sq, onnx_file, tmp_path):
    model = sq.upload_model(onnx_file)
    assert (model.name, model.format, model.size_bytes) == ("tiny.onnx", "onnx", onnx_file.stat().st_size)
    assert model.sha256 == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    with open(onnx_file, "rb") as f:
        renamed = sq.upload_model(f, name="renamed.onnx")
    stream = ReadOnly(tiny_onnx())
    chunked = sq.upload_model(stream, name="piped.onnx")
    assert chunked.sha256 == model.sha256 and stream.reads >= 2 and renamed.name == "renamed.onnx"

    page = sq.list_models(limit=2)
    assert len(page.data) == 2 and page.has_more and page.next
    assert {m.id for m in sq.list_models().data} == {model.id, renamed.id, chunked.id}
    assert sq.get_model(model.id) == model

    into_folder = sq.download_model(model.id, tmp_path / "out")  # a folder that does not exist yet is a file name
    assert into_folder.read_bytes() == onnx_file.read_bytes()
    (tmp_path / "dir").mkdir()
    in_dir = sq.download_model(model.id, tmp_path / "dir")
    assert in_dir == tmp_path / "dir" / "tiny.onnx" and in_dir.read_bytes() == onnx_file.read_bytes()
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["tiny.onnx"]  # no temp file left behind

    npz = tmp_path / "eval.npz"
    npz.write_bytes(npz_bytes(x=np.zeros((4, 4), np.float32), labels=np.arange(4)))
    ds = sq.upload_dataset(npz)
    assert ds.format == "npz" and sq.get_dataset(ds.id).id == ds.id
    assert [d.id for d in sq.list_datasets().data] == [ds.id]
    assert sq.download_dataset(ds.id, tmp_path / "copy.npz").read_bytes() == npz.read_bytes()

    sq.delete_model(renamed.id)
    sq.delete_dataset(ds.id)
    with pytest.raises(NotFound) as caught:
        sq.get_model(renamed.id)
    assert caught.value.status == 404 and caught.value.code == "not_found" and caught.value.details["id"] == renamed.id
    with pytest.raises(NotFound):
        sq.download_dataset(ds.id, tmp_path / "gone.npz")
    assert not (tmp_path / "gone.npz").exists()


def test_errors_carry_the_server_code_message_and_fields(api, sq, onnx_file, monkeypatch):
    with pytest.raises(Unauthorized) as caught:
        Client(http=api, api_key="sqz_wrong").list_models()
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    with pytest.raises(Unauthorized) as caught:
        sq.create_key("other")  # admin only: 403
    assert caught.value.status == 403

    model = sq.upload_model(onnx_file)
    with pytest.raises(Invalid) as caught:
        sq.create_job(model.id, {"steps": [{"type": "prune", "sparsity": 1.5}]})
    assert caught.value.code == "invalid_recipe"
    assert caught.value.field_errors[0]["field"] == "recipe.steps[0].sparsity"
    assert "recipe.steps[0].sparsity" in str(caught.value)
    with pytest.raises(NotFound):
        sq.create_job("mdl_nope", "prune-50")
    with pytest.raises(Unsupported) as caught:
        sq.upload_model(ReadOnly(b"just some text, not a model"), name="notes.txt")
    assert caught.value.status == 415

    job = sq.create_job(model.id, "prune-50", idempotency_key="k1")
    assert sq.create_job(model.id, "prune-50", idempotency_key="k1").id == job.id
    with pytest.raises(Conflict) as caught:
        sq.create_job(model.id, "prune-50", metadata={"x": 1}, idempotency_key="k1")
    assert caught.value.code == "idempotency_conflict"

    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 1000)
    with pytest.raises(TooLarge) as caught:
        sq.upload_model(ReadOnly(b"\0" * 5000), name="big.onnx")
    assert caught.value.details["limit_bytes"] == 1000

    with pytest.raises(Unreachable) as caught:
        Client(url="http://127.0.0.1:9", api_key="k").health()
    assert caught.value.code == "unreachable" and "127.0.0.1:9" in caught.value.message


def test_jobs_wait_events_stream_rerun(sq, onnx_file, monkeypatch):
    model = sq.upload_model(onnx_file)
    job = sq.create_job(model.id, "prune-50", metadata={"ticket": "ML-1"})
    assert job.status == "queued" and job.metadata == {"ticket": "ML-1"} and job.outputs == ["onnx", "safetensors"]
    assert [j.id for j in sq.list_jobs(status="queued").data] == [job.id]
    assert sq.list_jobs(status="running").data == []

    with pytest.raises(WaitTimeout) as caught:  # no worker here: it stays queued
        sq.wait(job.id, timeout=0.5)
    assert caught.value.job.status == "queued"

    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 12:
            sq.cancel_job(job.id)

    monkeypatch.setattr(client_module.time, "sleep", sleep)
    seen = []
    done = sq.wait(job.id, on_progress=seen.append)
    assert done.status == "canceled" and [j.status for j in seen] == ["queued", "canceled"]
    assert seen[0].stage == "queued"  # no stage yet: the status, never None
    assert delays[:3] == pytest.approx([0.2, 0.3, 0.45]) and delays == sorted(delays)
    assert max(delays) == 2.0  # backed off, growing to 2 s while nothing changed
    monkeypatch.undo()

    events = sq.events(job.id)
    assert [e.type for e in events] == ["queued", "cancel_requested"]
    streamed = list(sq.stream_events(job.id))  # the job has ended: the stream ends after its events
    assert [e.id for e in streamed] == [e.id for e in events]
    assert [e.id for e in sq.stream_events(job.id, last_event_id=events[0].id)] == [events[1].id]
    assert [e.id for e in sq.events(job.id, after=events[0].id)] == [events[1].id]

    again = sq.rerun_job(job.id)
    assert again.id != job.id and again.status == "queued" and again.metadata["rerun_of"] == job.id
    assert {j.id for j in sq.iter_jobs()} == {job.id, again.id}


def test_recipes_keys_health_sweeps_compare(api, sq, onnx_file):
    assert "prune-50" in [p["name"] for p in sq.presets()]
    assert "steps" in sq.recipe_schema()["properties"]
    ok = sq.validate_recipe("prune-50", model_format="pt2")
    assert ok.valid and ok.outputs == ["pt2", "safetensors"]
    bad = sq.validate_recipe({"steps": [], "x": 1})
    assert not bad.valid and {e["field"] for e in bad.errors} == {"recipe.steps", "recipe.x"}
    assert sq.health() == {"status": "ok"} and sq.ready()["status"] == "ok"

    admin = Client(http=api)  # the TestClient already carries the admin key
    created = admin.create_key("robots", name="ci")
    assert created.key.startswith("sqz_") and created.id in {k.id for k in admin.list_keys()}
    admin.revoke_key(created.id)
    with pytest.raises(Unauthorized):
        Client(http=api, api_key=created.key).list_jobs()

    model = sq.upload_model(onnx_file)
    sweep = sq.create_sweep(model.id, "prune-50", {"steps[0].sparsity": [0.3, 0.5]}, "smallest")
    assert sweep.points_total == 2 and not sweep.done
    assert sq.get_sweep(sweep.id).id == sweep.id and [s.id for s in sq.list_sweeps().data] == [sweep.id]
    assert sq.sweep_pareto_png(sweep.id)[:4] == b"\x89PNG"
    comparison = sq.compare_jobs(model.id)
    assert comparison.model_id == model.id and comparison.data == []
    assert sq.compare_jobs_png(model.id)[:4] == b"\x89PNG"


def test_client_and_cli_import_nothing_of_the_server():
    import subprocess
    import sys

    from testing.stack import ROOT

    code = ("import sys, squeeze_client, squeeze_client.cli; "
            "server = ('app', 'worker', 'torch', 'onnx', 'onnxruntime', 'fastapi', 'sqlalchemy', 'psycopg', 'celery', "
            "'pydantic_settings'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in server]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_list_by_sha256_finds_the_teams_own_file_and_upload_reuses_it(api, sq, onnx_file, tmp_path):
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert sq.find_model(digest) is None
    first = sq.upload_model(onnx_file, reuse=True)
    again = sq.upload_model(onnx_file, reuse=True)  # the same bytes: found by digest, not sent
    assert again.id == first.id and [m.id for m in sq.list_models().data] == [first.id]
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(onnx_file.read_bytes())
    assert sq.upload_model(copy, reuse=True).id == first.id  # another name, same content
    forced = sq.upload_model(onnx_file)  # reuse is asked for, not the default
    assert forced.id != first.id and sq.find_model(digest).id == forced.id  # the newest first

    answer = api.get("/v1/models", params={"sha256": digest}, headers=sq._auth).json()
    assert {m["id"] for m in answer["data"]} == {first.id, forced.id}
    other = Client(http=api, api_key=new_team_key(api, "other-team"))
    assert other.find_model(digest) is None  # another team's file is not found by its digest
    assert sq.find_dataset(digest) is None  # models and datasets apart
    bad = api.get("/v1/models", params={"sha256": "ABC"}, headers=sq._auth)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request", bad.text


def test_find_checks_the_digest_itself():
    """A server without the sha256 filter answers every file: the client still finds only the right one."""
    import httpx

    rows = [{"id": f"mdl_{n}", "name": "m.onnx", "format": "onnx", "sha256": digest, "size_bytes": 1, "details": {},
             "created_at": "2026-01-01T00:00:00Z", "url": "/f"} for n, digest in ((2, "b" * 64), (1, "a" * 64))]
    old_server = httpx.MockTransport(lambda request: httpx.Response(200, json={"data": rows, "has_more": False}))
    sq = Client(http=httpx.Client(base_url="http://old", transport=old_server))
    assert sq.find_model("a" * 64).id == "mdl_1" and sq.find_model("c" * 64) is None


def test_event_messages_are_never_none():
    step = EventOut(id=3, type="step_done", message=None, created_at="2026-01-01T00:00:00Z",
                    data={"index": 0, "type": "prune", "seconds": 1.25})
    assert step.message == "step 0 (prune) done in 1.2 s"
    done = EventOut(id=4, type="succeeded", message=None, data={}, created_at="2026-01-01T00:00:00Z")
    assert done.message == "succeeded"
    failed = EventOut(id=5, type="failed", message="", data={"error_code": "oom"}, created_at="2026-01-01T00:00:00Z")
    assert failed.message == "failed: oom"


def test_the_client_verifies_what_the_server_signs():
    from squeeze_client import WebhookVerificationError

    from app.webhooks.signing import new_secret, sign

    secret, body = new_secret(), b'{"type": "job.completed"}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000",
               "webhook-signature": sign(secret, "msg_1", 1700000000, body)}
    verify_webhook(secret, headers, body, now=1700000010)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, body + b" ", now=1700000010)
