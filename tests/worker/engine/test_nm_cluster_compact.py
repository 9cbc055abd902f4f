"""N:M pruning, k-means clustering and compact safetensors storage, on the digits models and through the sandbox."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from app.recipes import ClusterSpec, PruneSpec, Recipe
from testing import modelzoo as mz
from tests.worker.engine.test_sandbox import final, make_job, run_sandbox
from worker.engine import metrics
from worker.engine.compact import load_compact, read_manifest, restore_into, write_compact, write_model
from worker.engine.compact.storage import pack_indices, unpack_indices
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.passes import StepContext, pass_for
from worker.engine.passes.prune import input_axes, max_nonzeros_per_group
from worker.engine.pipeline import run_steps

TINY_SOURCE = '''\
from torch import nn


def build_model():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
'''


def apply(model, spec, index=0):
    return pass_for(spec).apply(model, spec, StepContext(index=index))


def accuracy_of(fmt_name, model, x, y):
    fmt = get_format(fmt_name)
    return metrics.accuracy(metrics.predict(fmt.runner(model, fmt.runtimes[0], 2), [x], fmt.fixed_batch(model)), y)


def check_nm(fmt_name: str, path, workdir, n: int, m: int) -> dict[str, float]:
    """Reload from disk; every group of m along each weight's input dim has <= n non-zeros. Returns sparsities."""
    fmt = get_format(fmt_name)
    model = fmt.load(path, workdir)
    axes = input_axes(model)
    out = {}
    for ref in fmt.eligible_weights(model):
        w = ref.read()
        assert max_nonzeros_per_group(w, m, axes.get(ref.name, 1)) <= n, ref.name
        out[ref.name] = float((w == 0).float().mean())
    return out


# --- N:M ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt_name", ["pt2", "onnx", "package"])
def test_2_4_on_mlp_every_format(zoo, digits, tmp_path, fmt_name):
    fmt = get_format(fmt_name)
    model = fmt.load(zoo[fmt_name], tmp_path)
    report = apply(model, PruneSpec(pattern="2:4"))
    assert report["pattern"] == "2:4" and report["sparsity_after"] == 0.5
    assert all(layer["sparsity_after"] == 0.5 and layer["max_nonzeros_per_group"] <= 2 and layer["bits"] == 32
               for layer in report["layers"])
    out = tmp_path / f"nm{fmt.suffix}"
    fmt.save(model, out)
    assert set(check_nm(fmt_name, out, tmp_path, 2, 4).values()) == {0.5}
    _, _, x, y = digits
    acc = accuracy_of(fmt_name, fmt.load(out, tmp_path), x, y)
    print(f"2:4 {fmt_name} MLP accuracy {acc:.4f}")
    assert acc > 0.85


def test_4_8_and_1_4(zoo, tmp_path):
    fmt = get_format("package")
    for pattern, (n, m) in (("4:8", (4, 8)), ("1:4", (1, 4))):
        model = fmt.load(zoo["package"], tmp_path)
        report = apply(model, PruneSpec(pattern=pattern))
        assert report["sparsity_after"] == pytest.approx(1 - n / m, abs=1e-9)
        out = tmp_path / f"{pattern.replace(':', '_')}.zip"
        fmt.save(model, out)
        assert set(check_nm("package", out, tmp_path, n, m).values()) == {1 - n / m}


def test_nm_groups_run_along_the_input_dim():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, -8.0, 0.5, 7.0, 0.1]])  # [out=1, in=8]
    from worker.engine.passes.prune import nm_mask

    kept = w.masked_fill(nm_mask(w, 2, 4, axis=1), 0)
    assert kept.tolist() == [[0, 0, 3.0, 4.0, -8.0, 0, 7.0, 0]]
    conv = torch.randn(3, 8, 2, 2)
    pruned = conv.masked_fill(nm_mask(conv, 2, 4, axis=1), 0)
    assert max_nonzeros_per_group(pruned, 4, 1) == 2  # groups of input channels at each (out, kh, kw)
    assert int((pruned.permute(0, 2, 3, 1).reshape(-1, 4) != 0).sum(1).max()) == 2


def _matmul_onnx(path, w: np.ndarray, transpose: bool):
    """y = x @ W with W an initializer stored [in, out] (or [out, in] behind a Transpose)."""
    init = numpy_helper.from_array(w.T.copy() if transpose else w, "W")
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"]), helper.make_node("MatMul", ["x", "Wt"], ["y"])] \
        if transpose else [helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])], [init])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("transpose", [False, True])
def test_onnx_matmul_weight_groups_along_its_input_dim(tmp_path, transpose):
    w = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)  # in=8, out=3: only dim 0 divides by 4
    fmt = get_format("onnx")
    model = fmt.load(_matmul_onnx(tmp_path / "mm.onnx", w, transpose), tmp_path)
    assert input_axes(model) == {"W": 1 if transpose else 0}
    apply(model, PruneSpec(pattern="2:4"))
    stored = numpy_helper.to_array(model.handle.graph.initializer[0])
    as_in_out = stored.T if transpose else stored
    assert ((as_in_out.reshape(2, 4, 3) != 0).sum(axis=1) == 2).all()


def test_unsupported_pattern_names_the_layer_unless_ignored(tmp_path):
    torch.manual_seed(0)
    path = mz.write_package(mz.build_from_source(TINY_SOURCE), tmp_path / "tiny.zip", TINY_SOURCE)
    fmt = get_format("package")
    model = fmt.load(path, tmp_path)
    with pytest.raises(EngineError) as err:
        apply(model, PruneSpec(pattern="4:8"), index=2)
    assert err.value.code == "unsupported_pattern"
    assert "0.weight [16, 6]" in err.value.message and "ignore" in err.value.message and "steps[2]" in err.value.message
    assert "2.weight" not in err.value.message
    report = apply(model, PruneSpec(pattern="4:8", ignore=["0.weight"]))
    assert [layer["name"] for layer in report["layers"]] == ["2.weight"] and report["skipped"] == ["0.weight"]
    assert report["sparsity_after"] == 0.5


def test_unstructured_is_unchanged(zoo, tmp_path):
    model = get_format("pt2").load(zoo["pt2"], tmp_path)
    report = apply(model, PruneSpec(sparsity=0.5, scope="layer"))
    assert report["pattern"] == "unstructured" and all(layer["bits"] == 32 for layer in report["layers"])
    assert all(abs(layer["sparsity_after"] - 0.5) < 0.005 for layer in report["layers"])


# --- clustering --------------------------------------------------------------------------------------------------

def test_cluster_16_on_cnn(zoo, digits, tmp_path):
    fmt = get_format("package")
    model = fmt.load(zoo["cnn_package"], tmp_path)
    _, _, x, y = digits
    images = mz.as_images(x)
    before = accuracy_of("package", model, images, y)
    report = apply(model, ClusterSpec(clusters=16))
    assert {layer["name"] for layer in report["layers"]} == {"0.weight", "2.weight", "6.weight", "8.weight"}
    for layer in report["layers"]:
        assert layer["clusters"] <= 16 and layer["bits"] == 4 and 0 < layer["max_abs_change"] < 1
    out = tmp_path / "clustered.zip"
    fmt.save(model, out)
    reloaded = fmt.load(out, tmp_path)
    for ref in fmt.eligible_weights(reloaded):
        values = torch.unique(ref.read())
        assert values.numel() <= 16
        assert torch.equal(values.half().float(), values)  # centroids snapped to fp16
    after = accuracy_of("package", reloaded, images, y)
    print(f"cluster-16 CNN accuracy {before:.4f} -> {after:.4f}")
    assert before - after <= 0.02


def test_cluster_keeps_zeros_and_small_palettes(zoo, tmp_path):
    model = get_format("pt2").load(zoo["pt2"], tmp_path)
    run_steps(model, Recipe(steps=[PruneSpec(sparsity=0.8, scope="layer"), ClusterSpec(clusters=4)]))
    for ref in get_format("pt2").eligible_weights(model):
        w = ref.read()
        assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.005) and torch.unique(w).numel() <= 4
    with pytest.raises(EngineError) as err:  # already <= 4 values everywhere: nothing to do
        apply(model, ClusterSpec(clusters=8), index=1)
    assert err.value.code == "no_effect"


def test_cluster_no_effect_when_targets_match_nothing(zoo, tmp_path):
    model = get_format("onnx").load(zoo["onnx"], tmp_path)
    with pytest.raises(EngineError) as err:
        apply(model, ClusterSpec(clusters=16, targets=["encoder.*"]), index=0)
    assert err.value.code == "no_effect" and "0.weight" in err.value.message


# --- compact storage ---------------------------------------------------------------------------------------------

def test_compact_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((64, 33)).astype(np.float32)
    sparse = dense.copy()
    sparse[rng.random(sparse.shape) < 0.8] = 0
    sparse[0, 0] = -0.0
    palette = rng.standard_normal(16).astype(np.float16).astype(np.float32)[rng.integers(0, 16, (37, 29))]
    odd_palette = rng.standard_normal(5)[rng.integers(0, 5, (50,))]  # float64, not fp16-exact
    tensors = {"dense": dense, "sparse": sparse, "palette": palette, "odd": odd_palette,
               "ints": np.arange(12, dtype=np.int64).reshape(3, 4), "scalar": np.array(3.5, np.float32),
               "empty": np.zeros((0, 3), np.float32), "torch": torch.randn(4, 4)}
    manifest = write_compact(tensors, tmp_path / "c.safetensors")
    layouts = {k: v["layout"] for k, v in manifest["tensors"].items()}
    assert layouts["dense"] == "dense" and layouts["sparse"] == "sparse" and layouts["palette"] == "palette"
    assert manifest["tensors"]["palette"]["bits"] == 4 and manifest["tensors"]["palette"]["codebook_dtype"] == "float16"
    assert manifest["tensors"]["odd"]["codebook_dtype"] == "float64" and manifest["tensors"]["odd"]["bits"] == 3
    assert read_manifest(tmp_path / "c.safetensors") == manifest
    restored = load_compact(tmp_path / "c.safetensors")
    tensors["torch"] = tensors["torch"].numpy()
    for name, a in tensors.items():
        assert restored[name].dtype == a.dtype and restored[name].shape == a.shape
        assert restored[name].tobytes() == a.tobytes(), name
    assert np.signbit(restored["sparse"][0, 0])


@pytest.mark.parametrize("bits", range(1, 9))
def test_index_packing_round_trip(bits):
    idx = np.random.default_rng(bits).integers(0, 2 ** bits, 1001).astype(np.uint8)
    packed = pack_indices(idx, bits)
    assert packed.size == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_indices(packed, bits, 1001), idx)
    if bits == 4:  # little-endian: element 0 in the low nibble of byte 0
        assert packed[0] == idx[0] | (idx[1] << 4)


def test_compact_cnn_sizes(zoo, digits, tmp_path, cnn):
    _, _, x, y = digits
    fp32_pt2 = mz.export_pt2(cnn, mz.as_images(x), tmp_path / "cnn.pt2")
    fmt = get_format("pt2")
    results = {}
    for label, steps, want in (("prune-80", [PruneSpec(sparsity=0.8)], 2.5), ("cluster-16", [ClusterSpec()], 6.0)):
        model = fmt.load(fp32_pt2, tmp_path)
        run_steps(model, Recipe(steps=steps))
        path = tmp_path / f"{label}.safetensors"
        write_model(model, path)
        ratio = fp32_pt2.stat().st_size / path.stat().st_size
        restored = fmt.load(fp32_pt2, tmp_path)
        restore_into(restored, load_compact(path))
        acc = accuracy_of("pt2", restored, mz.as_images(x), y)
        results[label] = (ratio, acc)
        print(f"{label}: fp32 pt2 {fp32_pt2.stat().st_size} B -> compact {path.stat().st_size} B "
              f"({ratio:.2f}x), accuracy {acc:.4f}")
        assert ratio >= want
        for (name, a), (_, b) in zip(fmt.parameters(model), fmt.parameters(restored)):
            assert torch.equal(a, b), name


# --- sandbox -----------------------------------------------------------------------------------------------------

def test_sandbox_safetensors_only(zoo, tmp_path):
    recipe = {"steps": [{"type": "cluster", "clusters": 16}]}
    job = make_job(tmp_path, zoo["cnn_package"], "package", recipe, ["safetensors"], {"eval": zoo["cnn_eval"]})
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert [a["format"] for a in result["artifacts"]] == ["safetensors", "png", "json"]
    m = result["metrics"]
    size = (job / "out" / "model.safetensors").stat().st_size
    assert m["compressed"]["format"] == "safetensors" and m["compressed"]["size_bytes"] == size
    assert m["compressed"]["safetensors_size_bytes"] == size
    assert m["ratios"]["safetensors_size"] == m["ratios"]["size"] > 4
    assert m["original"]["accuracy"] - m["compressed"]["accuracy"] <= 0.02 and "torch" in m["compressed"]["latency_ms"]
    assert {layer["name"]: layer["bits"] for layer in m["layers"]} == dict.fromkeys(
        ["0.weight", "2.weight", "6.weight", "8.weight"], 4)
    print(f"sandbox cluster-16 CNN package -> safetensors: {m['ratios']['size']}x, accuracy "
          f"{m['original']['accuracy']} -> {m['compressed']['accuracy']}")


def test_sandbox_pt2_and_safetensors(zoo, tmp_path):
    recipe = {"steps": [{"type": "prune", "method": "magnitude", "pattern": "2:4"}]}
    job = make_job(tmp_path, zoo["pt2"], "pt2", recipe, ["pt2", "safetensors"], {"eval": zoo["eval"]})
    rc, lines, err = run_sandbox(job)
    assert rc == 0, err
    result = final(lines)
    assert [a["name"] for a in result["artifacts"]] == ["model.pt2", "model.safetensors", "report.png", "report.json"]
    m = result["metrics"]
    out = job / "out"
    assert m["compressed"]["format"] == "pt2" and m["compressed"]["size_bytes"] == (out / "model.pt2").stat().st_size
    assert m["compressed"]["safetensors_size_bytes"] == (out / "model.safetensors").stat().st_size
    assert m["ratios"]["safetensors_size"] == pytest.approx(
        m["original"]["size_bytes"] / m["compressed"]["safetensors_size_bytes"], rel=1e-3)
    assert m["ratios"]["safetensors_size"] > 1.2 and m["compressed"]["sparsity"] == 0.5
    assert all(layer["bits"] == 32 for layer in m["layers"])
    print(f"sandbox 2:4 MLP pt2 -> safetensors {m['ratios']['safetensors_size']}x, accuracy "
          f"{m['compressed']['accuracy']}")
    model = get_format("pt2").load(out / "model.pt2", tmp_path)
    restored = load_compact(out / "model.safetensors")
    for name, t in get_format("pt2").parameters(model):
        assert restored[name].tobytes() == t.detach().numpy().tobytes()
