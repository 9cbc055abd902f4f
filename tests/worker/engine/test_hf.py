"""The Hugging Face folder format: a tiny BERT built from a config (no downloads), pruned, saved, reloaded."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from app.files.screening import ScreeningError, sniff_model
from app.recipes import Recipe, RecipeError, check_against_format, parse_recipe
from testing import modelzoo as mz
from tests.worker.engine.test_sandbox import FAST_EVAL, final, run_sandbox
from worker.engine.datasets import Dataset
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.pipeline import run_steps

transformers = pytest.importorskip("transformers")
LIMITS = {"max_unpacked_bytes": 1 << 30, "max_entries": 1000}


@pytest.fixture(scope="module")
def bert():
    torch.set_num_threads(2)
    return mz.build_tiny_bert()


@pytest.fixture(scope="module")
def bert_zip(tmp_path_factory, bert) -> Path:
    return mz.write_hf_zip(bert, tmp_path_factory.mktemp("hf") / "bert.zip")


@pytest.fixture(scope="module")
def tokens(digits):
    _, _, x_test, y_test = digits
    return mz.digits_tokens(x_test), y_test


def _logits(net, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(input_ids=torch.from_numpy(ids)).logits.numpy()


def _reload_hf(zip_path: Path, dest: Path):
    zipfile.ZipFile(zip_path).extractall(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(dest)).eval()


def test_loads_and_runs(bert, bert_zip, tokens, tmp_path):
    fmt = get_format("hf")
    model = fmt.load(bert_zip, tmp_path)
    ids, _ = tokens
    assert type(model.handle).__name__ == "BertForSequenceClassification"
    out = fmt.runner(model, "torch", 2)([ids[:16]])
    assert out.shape == (16, 10)
    np.testing.assert_allclose(out, _logits(bert, ids[:16]), atol=1e-6)
    names = [r.name for r in fmt.eligible_weights(model)]
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert "bert.encoder.layer.0.intermediate.dense.weight" in names
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)


def test_magnitude_prune_then_hf_output_reloads(bert_zip, tokens, tmp_path):
    fmt = get_format("hf")
    model = fmt.load(bert_zip, tmp_path)
    ids, _ = tokens
    run_steps(model, parse_recipe("prune-50"), workdir=tmp_path)
    refs = fmt.eligible_weights(model)
    zeros = sum(int((r.read() == 0).sum()) for r in refs) / sum(r.read().numel() for r in refs)
    assert zeros == pytest.approx(0.5, abs=0.01)
    in_memory = fmt.runner(model, "torch", 2)([ids[:32]])
    fmt.export(model, "hf", tmp_path / "out.zip", [ids[:2]])
    reloaded = _reload_hf(tmp_path / "out.zip", tmp_path / "out")
    np.testing.assert_allclose(_logits(reloaded, ids[:32]), in_memory, atol=1e-6)


def test_channel_prune_shrinks_mlp_and_reloads(bert_zip, tokens, tmp_path):
    fmt = get_format("hf")
    model = fmt.load(bert_zip, tmp_path)
    ids, labels = tokens
    data = {"eval": Dataset(name="eval", inputs={"input_ids": ids}, labels=labels)}
    recipe = parse_recipe({"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}]})
    report = run_steps(model, recipe, datasets=data, workdir=tmp_path)[0]
    assert model.handle.config.intermediate_size == 32
    assert report["macs_after"] < report["macs_before"] and report["params_after"] < report["params_before"]
    assert model.extra["architecture_changed"]
    pruned = {layer["name"] for layer in report["layers"] if layer["pruned"]}
    assert pruned == {f"bert.encoder.layer.{i}.{n}.dense.weight" for i in (0, 1) for n in ("intermediate", "output")}
    in_memory = fmt.runner(model, "torch", 2)([ids[:32]])
    fmt.export(model, "hf", tmp_path / "out.zip", [ids[:2]])
    reloaded = _reload_hf(tmp_path / "out.zip", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == 32
    np.testing.assert_allclose(_logits(reloaded, ids[:32]), in_memory, atol=1e-6)
    again = fmt.load(tmp_path / "out.zip", tmp_path)  # and through the format itself
    np.testing.assert_allclose(fmt.runner(again, "torch", 2)([ids[:32]]), in_memory, atol=1e-6)
    for target, suffix, runtime in (("pt2", ".pt2", "torch"), ("onnx", ".onnx", "onnxruntime")):
        fmt.export(model, target, tmp_path / f"m{suffix}", [ids[:2]])
        out_fmt = get_format(target)
        out = out_fmt.runner(out_fmt.load(tmp_path / f"m{suffix}", tmp_path), runtime, 2)([ids[:32]])
        np.testing.assert_allclose(out, in_memory, atol=1e-4)


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_head_pruning_removes_heads_and_exports(bert_zip, tokens, tmp_path, importance):
    fmt = get_format("hf")
    model = fmt.load(bert_zip, tmp_path)
    ids, labels = tokens
    data = {"calibration": Dataset(name="calibration", inputs={"input_ids": ids}, labels=labels)}
    recipe = parse_recipe({"steps": [{"type": "prune", "method": "channel", "sparsity": 0, "heads": 0.5,
                                      "importance": importance}]})
    report = run_steps(model, recipe, datasets=data, workdir=tmp_path)[0]
    assert [(h["name"], h["heads_before"], h["heads_after"]) for h in report["heads"]] == [
        (f"bert.encoder.layer.{i}.attention", 4, 2) for i in (0, 1)]
    for i, block in enumerate(report["heads"]):
        # The removed heads are the two least important by the reported scores.
        assert block["removed"] == sorted(np.argsort(block["importance"])[:2].tolist())
        attn = model.handle.bert.encoder.layer[i].attention
        assert attn.self.query.weight.shape == (16, 32) and attn.self.value.bias.shape == (16,)
        assert attn.output.dense.weight.shape == (32, 16)
    assert model.handle.config.intermediate_size == 64  # MLP width untouched: sparsity 0
    assert report["macs_after"] < report["macs_before"] and report["params_after"] < report["params_before"]
    in_memory = fmt.runner(model, "torch", 2)([ids[:32]])
    assert in_memory.shape == (32, 10) and np.isfinite(in_memory).all()
    for target, suffix, runtime in (("pt2", ".pt2", "torch"), ("onnx", ".onnx", "onnxruntime")):
        fmt.export(model, target, tmp_path / f"m{suffix}", [ids[:2]])
        out_fmt = get_format(target)
        out = out_fmt.runner(out_fmt.load(tmp_path / f"m{suffix}", tmp_path), runtime, 2)([ids[:32]])
        np.testing.assert_allclose(out, in_memory, atol=1e-4)
    with pytest.raises(EngineError, match="attention heads"):
        fmt.save(model, tmp_path / "out.zip")


def test_head_pruning_refusals(bert_zip, tokens, tmp_path):
    fmt = get_format("hf")
    ids, labels = tokens
    data = {"calibration": Dataset(name="calibration", inputs={"input_ids": ids}, labels=labels)}
    cases = [({"heads": 0.2}, "no_effect", "removes no head"),  # floor(0.2 x 4) = 0
             ({"heads": 0.5, "targets": ["*.intermediate.*"]}, "no_effect", "no attention block matched")]
    for extra, code, message in cases:
        model = fmt.load(bert_zip, tmp_path)
        recipe = parse_recipe({"steps": [{"type": "prune", "method": "channel", "sparsity": 0, **extra}]})
        with pytest.raises(EngineError, match=message) as err:
            run_steps(model, recipe, datasets=data, workdir=tmp_path)
        assert err.value.code == code
    with pytest.raises(RecipeError, match="sparsity .channels. or heads"):
        parse_recipe({"steps": [{"type": "prune", "method": "channel", "sparsity": 0}]})


def test_recipe_outputs_for_head_pruning():
    heads = parse_recipe({"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5, "heads": 0.5}]})
    assert check_against_format(heads, "hf") == ["pt2", "onnx"]  # a config cannot describe pruned heads
    with pytest.raises(RecipeError) as err:
        check_against_format(Recipe.model_validate({**heads.model_dump(), "outputs": ["onnx", "hf"]}), "hf")
    assert err.value.errors[0]["field"] == "outputs[1]" and "pt2 or onnx" in err.value.errors[0]["message"]
    with pytest.raises(RecipeError) as err:
        check_against_format(heads, "package")
    assert err.value.errors[0]["field"] == "steps[0].heads"


def test_recipe_outputs_for_hf():
    channel = parse_recipe({"steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}]})
    assert check_against_format(channel, "hf") == ["hf"]
    assert check_against_format(parse_recipe("prune-50"), "hf") == ["hf", "safetensors"]  # the smaller file
    for bad in ("package", "safetensors"):
        with pytest.raises(RecipeError):
            check_against_format(Recipe.model_validate({**channel.model_dump(), "outputs": [bad]}), "hf")
    assert check_against_format(Recipe.model_validate({**channel.model_dump(), "outputs": ["hf", "onnx"]}),
                                "hf") == ["hf", "onnx"]


def test_sandbox_channel_prune_hf(bert_zip, tokens, tmp_path):
    ids, labels = tokens
    job = tmp_path / "job"
    (job / "inputs").mkdir(parents=True)
    shutil.copy(bert_zip, job / "inputs" / "model.zip")
    mz.write_npz(job / "inputs" / "eval.npz", {"input_ids": ids}, labels)
    spec = {"job_id": "job-1", "model": {"path": "inputs/model.zip", "format": "hf"},
            "recipe": {"evaluate": FAST_EVAL, "steps": [{"type": "prune", "method": "channel", "sparsity": 0.5}]},
            "outputs": ["hf"], "datasets": {"eval": "inputs/eval.npz"}, "threads": 2}
    (job / "job.json").write_text(json.dumps(spec))
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert [a["format"] for a in result["artifacts"]][0] == "hf"
    m = result["metrics"]
    assert m["original"]["format"] == "hf" and m["compressed"]["format"] == "hf"
    assert m["compressed"]["accuracy"] is not None and m["compressed"]["agreement"] is not None
    reloaded = _reload_hf(job / "out" / "model-hf.zip", tmp_path / "reloaded")
    assert reloaded.config.intermediate_size == 32


def test_hf_folder_without_eval_dataset_runs_on_config_shaped_inputs(bert_zip, tmp_path):
    job = tmp_path / "job"
    (job / "inputs").mkdir(parents=True)
    shutil.copy(bert_zip, job / "inputs" / "model.zip")
    spec = {"job_id": "job-1", "model": {"path": "inputs/model.zip", "format": "hf"},
            "recipe": {"evaluate": FAST_EVAL, "steps": [{"type": "prune", "sparsity": 0.5}]},
            "outputs": ["hf"], "datasets": {}, "threads": 2}
    (job / "job.json").write_text(json.dumps(spec))
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert result["type"] == "result", result
    m = result["metrics"]
    assert set(m["compressed"]["latency_ms"]["torch"]) == {"1", "8"} and m["compressed"]["agreement"] is None
    notes = json.loads((job / "out" / "report.json").read_text())["notes"]
    assert any("timed on random input_ids of shape (batch, " in n for n in notes), notes


def _hf_zip(path: Path, bert_zip: Path, extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
            config_update: dict | None = None, folder: str = "") -> Path:
    with zipfile.ZipFile(bert_zip) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            if name in drop:
                continue
            data = src.read(name)
            if name == "config.json" and config_update:
                data = json.dumps({**json.loads(data), **config_update}).encode()
            dst.writestr(folder + name, data)
        for name, data in (extra or {}).items():
            dst.writestr(folder + name, data)
    return path


def test_screening_accepts_hf_zip(bert_zip, tmp_path):
    sniffed = sniff_model(bert_zip, **LIMITS)
    assert sniffed.kind == "hf" and sniffed.details["model_type"] == "bert"
    assert sniffed.details["architectures"] == ["BertForSequenceClassification"]
    nested = _hf_zip(tmp_path / "nested.zip", bert_zip, folder="tiny-bert/",
                     extra={"tokenizer.json": b"{}", "vocab.txt": b"a\nb\n"})
    assert sniff_model(nested, **LIMITS).kind == "hf"
    assert get_format("hf").load(nested, tmp_path).handle.config.intermediate_size == 64


@pytest.mark.parametrize("case", ["model_py", "auto_map", "pytorch_model_bin", "no_weights", "bad_safetensors"])
def test_screening_refuses_bad_hf_zips(bert_zip, tmp_path, case):
    kwargs = {
        "model_py": {"extra": {"modeling_evil.py": b"import os\n"}},
        "auto_map": {"config_update": {"auto_map": {"AutoModel": "evil.Model"}}},
        "pytorch_model_bin": {"extra": {"pytorch_model.bin": b"PK\x03\x04"}, "drop": ("model.safetensors",)},
        "no_weights": {"drop": ("model.safetensors",)},
        "bad_safetensors": {"drop": ("model.safetensors",), "extra": {"model.safetensors": b"\x10" + b"\x00" * 7 + b"{}"}},
    }[case]
    with pytest.raises(ScreeningError) as err:
        sniff_model(_hf_zip(tmp_path / "bad.zip", bert_zip, **kwargs), **LIMITS)
    if case in ("model_py", "auto_map", "pytorch_model_bin"):
        assert err.value.status == 415
    if case == "pytorch_model_bin":
        assert "safe_serialization=True" in err.value.message
    else:
        assert err.value.status in (415, 422)


def test_format_refuses_auto_map_even_unscreened(bert_zip, tmp_path):
    from worker.engine.errors import EngineError

    bad = _hf_zip(tmp_path / "bad.zip", bert_zip, config_update={"auto_map": {"AutoModel": "x.Y"}})
    with pytest.raises(EngineError, match="auto_map"):
        get_format("hf").load(bad, tmp_path)
