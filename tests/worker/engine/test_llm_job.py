"""Causal LM jobs in the sandbox: text datasets tokenized by the model's tokenizer, llm-compressor steps, the
compressed-tensors and GGUF outputs reloaded and scored by perplexity, the guard on perplexity, patterns."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from testing.llm_assets import trained_lm_files, zip_folder
from tests.worker.engine.test_sandbox import final, run_sandbox
from worker.engine.errors import EngineError

pytestmark = pytest.mark.slow
TEXT = {"seq_len": 64, "eval_tokens": 512, "generate_tokens": 8}


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict[str, Path]:
    return trained_lm_files(tmp_path_factory.mktemp("lm"))


def _job(tmp_path: Path, lm: dict, recipe: dict, datasets=("calibration", "eval")) -> Path:
    job = tmp_path / "job"
    (job / "inputs").mkdir(parents=True)
    shutil.copy(lm["zip"], job / "inputs" / "model.zip")
    rel = {}
    for role in datasets:
        src = lm[role]
        rel[role] = f"inputs/{role}{src.suffix}"
        shutil.copy(src, job / rel[role])
    recipe = {"text": TEXT, "evaluate": {"repeats": 2, "warmup": 1}, **recipe}
    spec = {"job_id": "job-lm", "model": {"path": "inputs/model.zip", "format": "hf"}, "recipe": recipe,
            "outputs": recipe.get("outputs") or ["hf"], "datasets": rel, "threads": 2}
    (job / "job.json").write_text(json.dumps(spec))
    return job


def test_gptq_int4_job_writes_compressed_tensors_and_gguf_scored_by_perplexity(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    job = _job(tmp_path, lm, {"steps": [{"type": "quantize", "method": "weight_int4", "algorithm": "gptq",
                                         "group_size": 32}], "outputs": ["hf", "gguf"],
                              "guard": {"max_perplexity_increase": 0.5}})
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err[-3000:]
    result = final(lines)
    m = result["metrics"]
    llm = m["llm"]
    assert llm["eval"]["dataset"] == "eval" and llm["eval"]["seq_len"] == 64 and llm["eval"]["tokens"] >= 500
    assert set(llm["outputs"]) == {"hf", "gguf"}
    base = llm["original"]["perplexity"]
    for fmt, scored in llm["outputs"].items():
        assert scored["perplexity"] > 0 and scored["perplexity"] != base, fmt  # measured on the reloaded file
        assert 0 < scored["agreement"] <= 1 and scored["decode_tokens_per_s"] > 0
    assert llm["perplexity_increase"] == pytest.approx(
        max(s["perplexity"] for s in llm["outputs"].values()) / base - 1, abs=1e-5)
    step = json.loads((job / "out" / "report.json").read_text())["steps"][0]
    assert step["algorithm"] == "gptq" and step["layers_changed"] == 14  # 7 linears x 2 layers; lm_head kept
    assert all(layer["bits"] == 4 for layer in step["layers"] if layer["changed"])
    # The compressed-tensors folder: packed int4, reloaded by transformers on its own, with the tokenizer.
    folder = tmp_path / "hf"
    with zipfile.ZipFile(job / "out" / "model-hf.zip") as zf:
        zf.extractall(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.config.vocab_size > 0
    float_size = (lm["folder"] / "model.safetensors").stat().st_size
    assert m["compressed"]["output_sizes"]["gguf"] < float_size


def test_seq_len_above_the_context_is_refused(lm, tmp_path):
    """(The guard failing on perplexity runs through HTTP: tests/test_e2e_llm.py.)"""
    long = _job(tmp_path, lm, {"steps": [{"type": "prune", "sparsity": 0.5}], "text": {**TEXT, "seq_len": 4096}})
    _, lines, _ = run_sandbox(long)
    error = final(lines)
    assert error["type"] == "error" and error["code"] == "bad_dataset", error
    assert "above the model's context of 2048" in error["message"]


def test_patterns_re_and_unmatched(lm, tmp_path):
    from app.recipes import PruneSpec
    from worker.engine.formats import get_format
    from worker.engine.passes import StepContext, pass_for

    fmt = get_format("hf")
    model = fmt.load(lm["zip"], tmp_path)
    spec = PruneSpec(sparsity=0.5, targets=["re:.*mlp\\..*_proj"], ignore=["*.down_proj.weight"])
    report = pass_for(spec).apply(model, spec, StepContext(index=0))
    pruned = {layer["name"] for layer in report["layers"]}
    assert pruned == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up")}
    bad = PruneSpec(sparsity=0.5, ignore=["re:.*embeddings.*"])
    with pytest.raises(EngineError) as err:
        pass_for(bad).apply(fmt.load(lm["zip"], tmp_path), bad, StepContext(index=3))
    assert err.value.code == "no_effect" and "steps[3]: ignore pattern 're:.*embeddings.*'" in err.value.message
    assert "lm_head.weight" not in {r.name for r in fmt.eligible_weights(model)}  # the output head is not pruned


def test_text_readers_and_windows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.recipes import TextSpec
    from testing.llm_assets import save_tiny_tokenizer
    from worker.engine.text import load_tokenizer, read_text, tokenize

    save_tiny_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    pq.write_table(pa.table({"text": ["def f(x):\n    return x", "class A: pass"] * 40}), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n\n{"text": "the quick brown fox"}\n')
    (tmp_path / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    raw = read_text(tmp_path / "d.parquet", "calibration")
    assert raw.kind == "parquet" and len(raw.documents) == 80
    data = tokenize(raw, tokenizer, TextSpec(seq_len=16), context=2048)
    windows = data.inputs["input_ids"]
    assert windows.shape[1] == 16 and windows.dtype == np.int64
    assert windows.size == (len(data.stream) // 16) * 16 and tokenizer.eos_token_id in data.stream
    assert read_text(tmp_path / "d.jsonl", "eval").documents == ["hello world", "the quick brown fox"]
    with pytest.raises(EngineError, match="not UTF-8"):
        read_text(tmp_path / "bad.txt", "eval")
    with pytest.raises(EngineError, match="not one window"):
        tokenize(read_text(tmp_path / "d.jsonl", "eval"), tokenizer, TextSpec(seq_len=512), context=2048)


def test_sensitivity_and_mixed_precision_keep_the_worst_layer_at_8_bits(lm, tmp_path):
    from app.recipes import QuantizeSpec, TextSpec
    from worker.engine.formats import get_format
    from worker.engine.passes import StepContext, pass_for
    from worker.engine.text import load_tokenizer, read_text, tokenize

    fmt = get_format("hf")
    model = fmt.load(lm["zip"], tmp_path)
    data = tokenize(read_text(lm["calibration"], "calibration"), load_tokenizer(model.extra["folder"]),
                    TextSpec(seq_len=64), context=2048)
    spec = QuantizeSpec(method="weight_int4", algorithm="rtn", group_size=32, bits_budget=6.0, samples=8)
    report = pass_for(spec).apply(model, spec, StepContext(index=0, datasets={"calibration": data},
                                                           workdir=tmp_path))
    found = report["sensitivity"]
    assert [r["layer"] for r in found["layers"]] != [] and len(found["layers"]) == 2
    increases = [r["increase"] for r in found["layers"]]
    assert increases == sorted(increases, reverse=True) and found["baseline"] > 0
    kept = report["mixed"]["layers_8bit"]
    assert kept == [found["layers"][0]["layer"]] and 4 < report["mixed"]["bits_per_weight"] <= 6.0
    bits = {layer["name"]: layer["bits"] for layer in report["layers"] if layer["changed"]}
    assert {b for n, b in bits.items() if n.startswith(kept[0] + ".")} == {8}
    assert {b for n, b in bits.items() if not n.startswith(kept[0] + ".")} == {4}
    fmt.save(model, tmp_path / "mixed.zip")
    with zipfile.ZipFile(tmp_path / "mixed.zip") as zf:
        groups = json.loads(zf.read("config.json"))["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]


def test_a_bf16_lm_is_written_back_in_bf16_with_int4_decoder_weights(lm, tmp_path):
    """Computed in float32, written in the checkpoint's dtype: the unquantized embeddings stay 16-bit, so the int4
    folder is smaller than the bf16 one it came from (float32 would double the embeddings)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from app.recipes import QuantizeSpec
    from worker.engine.formats import get_format
    from worker.engine.passes import StepContext, pass_for

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(lm["folder"]).to(torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm["folder"] / name, bf16 / name)
    fmt = get_format("hf")
    model = fmt.load(zip_folder(bf16, tmp_path / "bf16.zip"), tmp_path)
    assert next(model.handle.parameters()).dtype == torch.float32 and model.extra["checkpoint_dtype"] == torch.bfloat16
    spec = QuantizeSpec(method="weight_int4", group_size=32)
    pass_for(spec).apply(model, spec, StepContext(index=0, workdir=tmp_path))
    fmt.save(model, tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        zf.extractall(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < (bf16 / "model.safetensors").stat().st_size
    assert next(model.handle.parameters()).dtype == torch.float32  # the model in memory is float32 again
