"""Each preset's `gives` matches what a job with it writes: the formats check_against_format chooses."""

import pytest

from app.recipes import PRESETS, RecipeError, check_against_format, parse_recipe


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_formats_are_what_the_job_writes(name):
    gives = PRESETS[name]["gives"]
    assert isinstance(gives["smaller_file"], bool) and isinstance(gives["faster"], bool)
    assert gives["note"] and "\n" not in gives["note"]
    written = []
    for fmt in ("pt2", "onnx", "package", "hf"):
        try:
            outputs = check_against_format(parse_recipe(name), fmt)
        except RecipeError:
            continue
        written.append(outputs)
        assert outputs == [fmt if f == "input" else f for f in gives["formats"]], (name, fmt)
    assert written, f"{name} fits no input format"


def test_pruning_writes_compact_storage_unless_outputs_are_named():
    assert check_against_format(parse_recipe({"steps": [{"type": "cluster"}]}), "onnx") == ["onnx", "safetensors"]
    named = parse_recipe({"steps": [{"type": "prune", "sparsity": 0.5}], "outputs": ["onnx"]})
    assert check_against_format(named, "pt2") == ["onnx"]
    quantized = parse_recipe({"steps": [{"type": "prune", "sparsity": 0.5}, {"type": "quantize"}]})
    assert check_against_format(quantized, "pt2") == ["pt2"]
