"""A causal LM through HTTP against a real server and worker: a Hugging Face folder with its tokenizer and text
datasets uploaded, GPTQ int4 judged by perplexity (SQLite), and the guard failing a pruned LM on perplexity
(PostgreSQL + Redis)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from testing.llm_assets import trained_lm_files
from testing.stack import wait_for
from tests.conftest import new_team_key
from tests.test_e2e import FAST_REAPER, upload
from tests.test_e2e_cli import cli_env, squeeze

pytestmark = pytest.mark.slow
TEXT = {"seq_len": 64, "eval_tokens": 512, "generate_tokens": 8}


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> dict[str, Path]:
    return trained_lm_files(tmp_path_factory.mktemp("lm-http"))


def _submit(client, lm_files: dict[str, Path], recipe: dict) -> str:
    model = upload(client, "models", lm_files["zip"])
    assert model["format"] == "hf" and "tokenizer.json" in model["details"]["tokenizer"], model
    datasets = {role: upload(client, "datasets", lm_files[role])["id"] for role in ("calibration", "eval")}
    r = client.post("/v1/jobs", json={"model_id": model["id"], "datasets": datasets,
                                      "recipe": {"text": TEXT, "evaluate": {"repeats": 2}, **recipe}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_gptq_lm_job_through_http_on_sqlite(stack_factory, lm_files, tmp_path):
    from transformers import AutoModelForCausalLM

    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker()
    client = stack.client(new_team_key(stack.admin, "llm"))
    job_id = _submit(client, lm_files, {"steps": [{"type": "quantize", "method": "weight_int4", "algorithm": "gptq",
                                                   "group_size": 32}]})
    job = wait_for(client, job_id, timeout=600)
    assert job["status"] == "succeeded", job["error"]
    llm = job["metrics"]["llm"]
    assert llm["eval"]["dataset"] == "eval" and llm["outputs"]["hf"]["perplexity"] > 0
    assert llm["perplexity_increase"] is not None and 0 < llm["outputs"]["hf"]["agreement"] <= 1
    art = next(a for a in job["artifacts"] if a["format"] == "hf")
    (tmp_path / "out.zip").write_bytes(client.get(art["url"]).content)
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        zf.extractall(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format"] \
        == "pack-quantized"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).config.num_hidden_layers == 2

    # The CLI as the README gives it: files uploaded (reused by sha256), the LLM table printed at 80 columns.
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(json.dumps({"steps": [{"type": "quantize", "method": "weight_int8"}], "text": TEXT,
                                  "evaluate": {"repeats": 2}}))
    env = {**cli_env(tmp_path, SQUEEZE_URL=stack.url, SQUEEZE_API_KEY=client.headers["Authorization"][7:]),
           "COLUMNS": "80"}
    done = squeeze(env, "compress", str(lm_files["zip"]), "--recipe", str(recipe), "--calibration",
                   str(lm_files["calibration"]), "--eval", str(lm_files["eval"]), "--output", str(tmp_path / "cli"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "perplexity" in done.stdout and "decode" in done.stdout, done.stdout
    assert max(len(line) for line in done.stdout.splitlines() if not line.startswith("wrote ")) <= 80, done.stdout
    assert "latency torch b32" not in done.stdout  # an LM is timed at batch 1 unless the recipe asks
    assert (tmp_path / "cli" / "model-hf.zip").is_file()


def test_guard_fails_a_pruned_lm_on_perplexity_on_postgres(stack_factory, lm_files):
    stack = stack_factory("postgres", **FAST_REAPER)
    stack.start_api()
    stack.start_worker()
    client = stack.client(new_team_key(stack.admin, "llm"))
    job_id = _submit(client, lm_files, {"steps": [{"type": "prune", "sparsity": 0.9}], "outputs": ["hf"],
                                        "guard": {"max_perplexity_increase": 0.05}})
    unmatched = _submit(client, lm_files, {"steps": [{"type": "prune", "sparsity": 0.5,
                                                      "ignore": ["re:.*embeddings.*"]}], "outputs": ["hf"]})
    job = wait_for(client, job_id, timeout=600)
    assert job["status"] == "failed" and job["error"]["code"] == "guard_failed", job
    assert "max_perplexity_increase" in job["error"]["message"]
    assert job["metrics"]["llm"]["perplexity_increase"] > 0.05
    # A pattern that matches nothing is never ignored silently: the job fails naming it.
    job = wait_for(client, unmatched, timeout=600)
    assert job["status"] == "failed" and job["error"]["code"] == "no_effect", job
    assert "ignore pattern 're:.*embeddings.*' matches no eligible weight" in job["error"]["message"]
