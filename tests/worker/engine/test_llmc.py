"""The llm-compressor adapter on a tiny random Llama: each kind really changes the model the way it says, bad inputs
fail with the right engine error, and the compressed-tensors folder reloads to the same logits."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from transformers import AutoModelForCausalLM, LlamaConfig

from worker.engine.errors import EngineError
from worker.engine.llm.compressed import load_compressed, save_compressed
from worker.engine.llm.llmc import LlmcStep, apply_llmc, match_modules

VOCAB = 512
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the adapter must never reach the hub."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def targeted(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def assert_on_group_grid(module: torch.nn.Module, bits: int, group: int) -> None:
    """The stored weight equals scale * integer on a symmetric `bits` grid, group by group along the input dim."""
    weight, scale = module.weight.detach().float(), module.weight_scale.detach().float()
    assert scale.shape == (weight.shape[0], weight.shape[1] // group)
    q = weight / scale.repeat_interleave(group, dim=1)
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.round().min() >= -(2 ** (bits - 1)) and q.round().max() <= 2 ** (bits - 1) - 1
    for g in range(weight.shape[1] // group):
        for row in weight[:, g * group:(g + 1) * group]:
            assert len(torch.unique(row)) <= 2 ** bits


def run(model, step, calibration, tmp_path, **kwargs) -> dict:
    report = apply_llmc(model, step, calibration, tmp_path / "work", **kwargs)
    json.dumps(report)  # JSON-able
    return report


# ------------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_puts_weights_on_the_int4_group_grid(act_order, calibration, probe, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = tiny_llama()
    before = logits(model, probe)
    head = model.lm_head.weight.detach().clone()
    seen: list[tuple[float, str]] = []
    report = run(model, LlmcStep(kind="gptq", group_size=32, act_order=act_order), calibration, tmp_path,
                 progress=lambda f, m: seen.append((f, m)))
    assert report["scheme"] == "W4A16" and report["group_size"] == 32 and report["symmetric"] is True
    assert report["pipeline"] == "sequential" and report["calibration"] == {"samples": 8, "seq_len": 32}
    assert report["modules"] == targeted(model) and report["ignored"] == ["lm_head"]
    assert report["library"].startswith("llmcompressor 0.14")
    assert report["peak_rss_mb"] >= 0 and report["seconds"] > 0
    for name in report["modules"]:
        assert_on_group_grid(model.get_submodule(name), bits=4, group=32)
    assert torch.equal(model.lm_head.weight, head) and not hasattr(model.lm_head, "weight_scale")
    assert (logits(model, probe) - before).abs().max() > 1e-3
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("layer 2/2" in m for _, m in seen)
    assert list(cwd.iterdir()) == []  # oneshot wrote nothing outside workdir
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["llmc-config"]


def test_a_calibrated_model_is_freed_once_dropped(calibration, tmp_path):
    """llm-compressor's sequential tracing registers pieces of the model's forward with torch.fx.wrap, whose
    process-wide registry kept the model alive: the job's result stage then held two models (bench/llm_memory.py).
    The job resets llm-compressor's session once the outputs are written (worker/engine/job/measure_llm.py)."""
    import gc
    import weakref

    from llmcompressor.core import reset_session

    model = tiny_llama()
    run(model, LlmcStep(kind="gptq", group_size=32), calibration, tmp_path)
    reset_session()
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_rtn_forward_uses_the_quantized_weights(probe, tmp_path):
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    before = logits(model, probe)
    report = run(model, LlmcStep(kind="rtn", bits=8, group_size=None, symmetric=False), None, tmp_path)
    assert report["scheme"] == "W8A16_ASYM" and report["pipeline"] == "datafree" and report["calibration"] is None
    q_proj = model.model.layers[0].self_attn.q_proj
    scale, zero = q_proj.weight_scale.detach(), q_proj.weight_zero_point.detach().float()
    assert scale.shape == (64, 1)  # one scale per output channel
    dequantized = (torch.clamp(torch.round(original / scale) + zero, -128, 127) - zero) * scale
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(q_proj(x), x @ dequantized.T, atol=1e-5)
        assert not torch.allclose(q_proj(x), x @ original.T, atol=1e-5)
    assert (logits(model, probe) - before).abs().max() > 0


def test_awq_scales_then_quantizes(calibration, probe, tmp_path):
    model = tiny_llama()
    norm = model.model.layers[0].post_attention_layernorm.weight.detach().clone()
    before = logits(model, probe)
    report = run(model, LlmcStep(kind="awq", group_size=32), calibration, tmp_path)
    assert report["pipelines"] == {"AWQModifier": "sequential", "QuantizationModifier": "datafree"}
    assert report["modules"] == targeted(model)
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight, norm)  # smoothing scales moved
    assert (logits(model, probe) - before).abs().max() > 1e-3


def test_w8a8_quantizes_weights_per_channel_and_activations(calibration, probe, tmp_path):
    model = tiny_llama()
    before = logits(model, probe)
    report = run(model, LlmcStep(kind="w8a8", smoothing_strength=0.5), calibration, tmp_path)
    assert report["scheme"] == "W8A8" and report["group_size"] is None
    assert set(report["pipelines"]) == {"SmoothQuantModifier", "GPTQModifier"}
    down = model.model.layers[1].mlp.down_proj
    assert_on_group_grid(down, bits=8, group=down.in_features)  # per channel = one group the whole row
    x = torch.randn(3, 128)
    with torch.no_grad():
        out, plain = down(x), x @ down.weight.T
    assert not torch.allclose(out, plain, atol=1e-6)  # the input is quantized too
    assert torch.allclose(out, plain, rtol=0.05, atol=0.05)
    assert (logits(model, probe) - before).abs().max() > 0


def test_fp8_is_data_free_and_changes_logits(calibration, probe, tmp_path):
    model = tiny_llama()
    before = logits(model, probe)
    report = run(model, LlmcStep(kind="fp8"), calibration, tmp_path)
    assert report["scheme"] == "FP8_DYNAMIC" and report["pipeline"] == "datafree" and report["calibration"] is None
    assert any("data-free" in n for n in report["notes"])
    assert (logits(model, probe) - before).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ sparsity


@pytest.mark.parametrize("kind,structure", [("sparsegpt", "0:0"), ("sparsegpt", "2:4"), ("wanda", "0:0")])
def test_pruning_reaches_the_sparsity(kind, structure, calibration, tmp_path):
    model = tiny_llama()
    report = run(model, LlmcStep(kind=kind, sparsity=0.5, mask_structure=structure), calibration, tmp_path)
    assert report["modules"] == targeted(model)
    assert report["scheme"] == ("sparse 50% 2:4" if structure == "2:4" else "sparse 50% unstructured")
    for name in report["modules"]:
        weight = model.get_submodule(name).weight.detach()
        assert (weight == 0).float().mean() >= 0.49
        if structure == "2:4":
            assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert (model.lm_head.weight != 0).all()
    assert 0.49 <= report["sparsity"] <= 0.51


# ------------------------------------------------------------------------------------------------ targets


def test_match_modules_patterns():
    model = tiny_llama()
    found = match_modules(model, [r"re:.*layers\.1\.self_attn\.[qk]_proj$", "Linear", "model.layers.*.mlp.up_proj",
                                  "lm_head", "re:.*nothing_here", "LlamaAttention"])
    assert found[r"re:.*layers\.1\.self_attn\.[qk]_proj$"] == ["model.layers.1.self_attn.q_proj",
                                                               "model.layers.1.self_attn.k_proj"]
    assert found["Linear"] == targeted(model) + ["lm_head"]
    assert found["model.layers.*.mlp.up_proj"] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert found["lm_head"] == ["lm_head"]
    assert found["re:.*nothing_here"] == [] and found["LlamaAttention"] == []  # only Linear modules count


def test_regex_targets_quantize_only_the_matched_modules(calibration, tmp_path):
    model = tiny_llama()
    untouched = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    # re:.*self_attn.* also matches the attention modules themselves: only their Linear children are quantized
    report = run(model, LlmcStep(kind="gptq", group_size=32, targets=["re:.*self_attn.*"], ignore=["*.o_proj"]),
                 calibration, tmp_path)
    expected = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")]
    assert report["modules"] == expected
    assert "model.layers.0.self_attn.o_proj" in report["ignored"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, untouched)
    assert not hasattr(model.model.layers[0].self_attn.o_proj, "weight_scale")


def test_fnmatch_targets_reach_llmcompressor(tmp_path):
    model = tiny_llama()
    report = run(model, LlmcStep(kind="rtn", group_size=32, targets=["model.layers.*.mlp.*"]), None, tmp_path)
    assert report["modules"] == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                 for p in ("gate_proj", "up_proj", "down_proj")]


def test_a_pattern_matching_nothing_is_no_effect(calibration, tmp_path):
    with pytest.raises(EngineError) as err:
        run(tiny_llama(), LlmcStep(kind="gptq", targets=["re:.*qproj$"]), calibration, tmp_path)
    assert err.value.code == "no_effect" and "re:.*qproj$" in err.value.message


def test_everything_ignored_is_no_effect(tmp_path):
    with pytest.raises(EngineError) as err:
        run(tiny_llama(), LlmcStep(kind="rtn", ignore=["Linear"]), None, tmp_path)
    assert err.value.code == "no_effect"


# ------------------------------------------------------------------------------------------------ bad inputs


def test_group_size_that_does_not_divide_a_width_names_the_layer(calibration, tmp_path):
    model = tiny_llama()
    with pytest.raises(EngineError) as err:
        run(model, LlmcStep(kind="gptq", group_size=48), calibration, tmp_path)
    assert err.value.code == "unsupported"
    assert "input width 64: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj" in err.value.message
    assert "input width 128: model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj" in err.value.message
    assert "group_size 32 divides every targeted width" in err.value.message
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "weight_scale")  # refused before anything ran


@pytest.mark.parametrize("kind", ["gptq", "awq", "w8a8", "sparsegpt", "wanda"])
def test_calibrating_kinds_need_data(kind, tmp_path):
    with pytest.raises(EngineError) as err:
        run(tiny_llama(), LlmcStep(kind=kind, group_size=32), None, tmp_path)
    assert err.value.code == "bad_dataset"


def test_token_ids_outside_the_vocabulary_are_bad_data(tmp_path):
    with pytest.raises(EngineError) as err:
        run(tiny_llama(), LlmcStep(kind="gptq", group_size=32), torch.full((2, 8), VOCAB), tmp_path)
    assert err.value.code == "bad_dataset" and str(VOCAB) in err.value.message


def test_bad_bits_and_mask_structure_are_unsupported(calibration, tmp_path):
    for step in (LlmcStep(kind="gptq", bits=3), LlmcStep(kind="wanda", mask_structure="4:2")):
        with pytest.raises(EngineError) as err:
            run(tiny_llama(), step, calibration, tmp_path)
        assert err.value.code == "unsupported"


# ------------------------------------------------------------------------------------------------ save / load


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_int4_round_trip_is_smaller_and_reloads_the_same_logits(calibration, probe, tmp_path):
    model = tiny_llama()
    float_folder = tmp_path / "float"
    assert "plain save_pretrained" in save_compressed(model, float_folder)[0]
    run(model, LlmcStep(kind="gptq", group_size=32), calibration, tmp_path)
    quantized = logits(model, probe)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in targeted(model)}
    notes = save_compressed(model, tmp_path / "int4")
    for name, weight in weights.items():  # unpacked again in memory, same values
        assert torch.equal(model.get_submodule(name).weight, weight)
    assert notes == ["compressed-tensors 0.19.0: format pack-quantized"]
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["format"] == "pack-quantized" and qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["config_groups"]["group_0"]["weights"]["group_size"] == 32
    ratio = folder_bytes(float_folder) / folder_bytes(tmp_path / "int4")
    assert ratio > 1.5, ratio
    reloaded = load_compressed(tmp_path / "int4")
    assert not reloaded.training
    assert torch.allclose(logits(reloaded, probe), quantized, atol=1e-4)
    assert torch.allclose(logits(model, probe), quantized, atol=1e-5)  # still usable after saving
    assert not list(tmp_path.glob(".llmc-config-*"))  # the scratch config folder is gone


@pytest.mark.parametrize("kind,fmt", [("w8a8", "int-quantized"), ("fp8", "float-quantized")])
def test_activation_quantized_round_trip(kind, fmt, calibration, probe, tmp_path):
    model = tiny_llama()
    run(model, LlmcStep(kind=kind), calibration, tmp_path)
    quantized = logits(model, probe)
    save_compressed(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format"] == fmt
    assert torch.allclose(logits(load_compressed(tmp_path / "out"), probe), quantized, atol=1e-4)


def test_sparse_round_trip_keeps_the_zeros(calibration, probe, tmp_path):
    model = tiny_llama()
    run(model, LlmcStep(kind="wanda", mask_structure="2:4"), calibration, tmp_path)
    pruned = logits(model, probe)
    notes = save_compressed(model, tmp_path / "out")
    assert any("no sparse storage format" in n for n in notes)
    reloaded = load_compressed(tmp_path / "out")
    weight = reloaded.model.layers[1].mlp.up_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert torch.allclose(logits(reloaded, probe), pruned, atol=1e-5)
