"""The quantize step: ONNX Runtime static/dynamic int8, PT2E int8 .pt2, torchao weight-only, binary storage."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from testing import modelzoo as mz
from tests.worker.engine.conftest import onnx_predict
from tests.worker.engine.test_sandbox import final, run_sandbox

FAST_EVAL = {"batch_sizes": [1, 32], "repeats": 3, "warmup": 1}
SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "package": ".zip", "hf": ".zip"}


def make_job(root: Path, model: Path, fmt: str, steps: list[dict], outputs: list[str] | None = None,
             datasets: dict[str, Path] | None = None, evaluate: dict | None = None) -> Path:
    job = root / "job"
    (job / "inputs").mkdir(parents=True)
    shutil.copy(model, job / "inputs" / f"model{SUFFIX[fmt]}")
    staged = {}
    for name, path in (datasets or {}).items():
        shutil.copy(path, job / "inputs" / f"{name}.npz")
        staged[name] = f"inputs/{name}.npz"
    from app.recipes import check_against_format, parse_recipe

    recipe = parse_recipe({"steps": steps, "outputs": outputs, "evaluate": {**FAST_EVAL, **(evaluate or {})}})
    spec = {"job_id": "job-q", "model": {"path": f"inputs/model{SUFFIX[fmt]}", "format": fmt},
            "recipe": recipe.model_dump(mode="json"), "outputs": check_against_format(recipe, fmt),
            "datasets": staged, "threads": 2}
    (job / "job.json").write_text(json.dumps(spec))
    return job


def run_ok(job: Path) -> tuple[dict, dict]:
    rc, lines, err = run_sandbox(job)
    result = final(lines)
    assert rc == 0, (result, err[-3000:])
    report = json.loads((job / "out" / "report.json").read_text())
    return result, report


@pytest.fixture(scope="module")
def cnn_data(tmp_path_factory, digits, cnn):
    root = tmp_path_factory.mktemp("qcnn")
    x_train, y_train, x_test, y_test = digits
    return {"package": mz.write_package(cnn, root / "cnn.zip", mz.CNN_SOURCE),
            "calibration": mz.write_npz(root / "cal.npz", mz.as_images(x_train[:512])),
            "eval": mz.write_npz(root / "eval.npz", mz.as_images(x_test), y_test)}


def test_static_int8_cnn_package_to_onnx(tmp_path, cnn_data):
    job = make_job(tmp_path, cnn_data["package"], "package", [{"type": "quantize", "method": "static_int8"}],
                   datasets={"calibration": cnn_data["calibration"], "eval": cnn_data["eval"]},
                   evaluate={"runtimes": ["onnxruntime"]})
    result, report = run_ok(job)
    m = result["metrics"]
    print(json.dumps({k: m[k] for k in ("ratios", "flags")}, indent=1))
    print(json.dumps(m["original"]["latency_ms"]), json.dumps(m["compressed"]["latency_ms"]))
    print(report["notes"], report["steps"][0]["kept_float"])
    assert [a["format"] for a in result["artifacts"]] == ["onnx", "png", "json"]
    proto = onnx.load(str(job / "out" / "model.onnx"))
    int8 = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert int8, "no int8 weights in the ONNX output"
    assert {n.op_type for n in proto.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert m["compressed"]["agreement"] >= 0.99
    assert m["ratios"]["accuracy_drop"] <= 0.005
    assert m["ratios"]["size"] >= 3.0
    assert "onnxruntime" in m["original"]["latency_ms"] and "onnxruntime" in m["compressed"]["latency_ms"]


def _ort_optimized_ops(path: Path, workdir: Path) -> list[str]:
    """The op types of the graph ONNX Runtime actually runs (after its layout and fusion passes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(workdir / (path.stem + ".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_flatten_channels_last_keeps_the_float_model_and_drops_the_int8_layout_transpose(tmp_path, cnn, digits):
    from worker.engine.passes.quantize import onnx_rewrites
    from worker.engine.passes.quantize import ort as ort_quant

    x_train, _, x_test, _ = digits
    images, calibration = mz.as_images(x_test), mz.as_images(x_train[:256])
    fp32 = mz.export_onnx(cnn, images, tmp_path / "cnn.onnx")
    proto = onnx.load(str(fp32))
    assert onnx_rewrites.flatten_channels_last(proto) == 1
    onnx.save(proto, str(tmp_path / "cnn-channels-last.onnx"))
    before, after = (onnx_predict(p, images) for p in (fp32, tmp_path / "cnn-channels-last.onnx"))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)  # a permutation, not an approximation

    # Quantized with and without the reordering (the patched variant is what quantize_static did before it): in
    # the graph ONNX Runtime runs, the NHWC -> NCHW transpose before the flatten is gone.
    from unittest import mock

    transposes = {}
    for reorder in (False, True):
        work = tmp_path / f"int8-reorder-{reorder}"
        work.mkdir()
        skip = mock.patch.object(ort_quant, "flatten_channels_last", return_value=0)
        with contextlib.nullcontext() if reorder else skip:
            quantized, notes, _ = ort_quant.quantize_static(onnx.load(str(fp32)), [calibration],
                                                            calibration="minmax", per_channel=True, exclude=[],
                                                            workdir=work, keep_norm=True)
        assert any("channels-last" in n for n in notes) == reorder, notes
        onnx.save(quantized, str(work / "int8.onnx"))
        ops = _ort_optimized_ops(work / "int8.onnx", work)
        assert "QLinearConv" in ops, ops
        transposes[reorder] = ops.count("Transpose")
        int8 = onnx_predict(work / "int8.onnx", images)
        assert (int8.argmax(1) == before.argmax(1)).mean() >= 0.97
    assert transposes[True] == transposes[False] - 1, transposes


@pytest.fixture
def untrained_resnet_onnx(tmp_path, digits) -> tuple[Path, np.ndarray]:
    """The tests' small ResNet, untrained (seed 0), as fp32 ONNX, and 64 inputs for it."""
    torch.manual_seed(0)
    net = mz.build_from_source(mz.RESNET_SOURCE).eval()
    images = mz.as_resnet_input(digits[2][:64])
    return mz.export_onnx(net, images, tmp_path / "resnet.onnx"), images


def test_resnet_tail_runs_in_int8_after_the_spatial_mean_rewrite(tmp_path, digits, untrained_resnet_onnx):
    """AdaptiveAvgPool2d(1) exports as ReduceMean, which has no int8 kernel: the last block's residual Add, its
    ReLU and the pooling used to run in float behind a DequantizeLinear. Rewritten as GlobalAveragePool (same
    values) and quantized with ONNX Runtime's full op set, the graph stays int8 up to the float classifier."""
    from worker.engine.passes.quantize import onnx_nodes, onnx_rewrites
    from worker.engine.passes.quantize import ort as ort_quant

    x_train, _, _, _ = digits
    fp32, images = untrained_resnet_onnx
    proto = onnx.load(str(fp32))
    assert "ReduceMean" in {n.op_type for n in proto.graph.node}
    assert onnx_rewrites.spatial_mean_to_global_pool(proto) == 1
    assert "ReduceMean" not in {n.op_type for n in proto.graph.node}
    onnx.save(proto, str(tmp_path / "resnet-pool.onnx"))
    before, after = (onnx_predict(p, images) for p in (fp32, tmp_path / "resnet-pool.onnx"))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)

    proto = onnx.load(str(fp32))
    onnx_nodes.name_nodes(proto)
    head = [node.name for node, _ in onnx_nodes.weight_nodes(proto)][-1]
    quantized, notes, _ = ort_quant.quantize_static(proto, [mz.as_resnet_input(x_train[:256])],
                                                    calibration="minmax", per_channel=True, exclude=[head],
                                                    workdir=tmp_path, keep_norm=True)
    assert any("GlobalAveragePool" in n for n in notes), notes
    onnx.save(quantized, str(tmp_path / "int8.onnx"))
    ops = _ort_optimized_ops(tmp_path / "int8.onnx", tmp_path)
    assert "QLinearGlobalAveragePool" in ops and ops.count("QLinearAdd") == 3, ops
    assert not {"Add", "Relu", "ReduceMean", "GlobalAveragePool"} & set(ops), ops
    int8 = onnx_predict(tmp_path / "int8.onnx", images)
    assert (int8.argmax(1) == before.argmax(1)).mean() >= 0.9


def test_static_int8_pt2_output_loads_and_runs_compiled(tmp_path, cnn_data, digits):
    job = make_job(tmp_path, cnn_data["package"], "package",
                   [{"type": "quantize", "method": "static_int8", "calibration": "percentile"}], outputs=["pt2"],
                   datasets={"calibration": cnn_data["calibration"], "eval": cnn_data["eval"]},
                   evaluate={"runtimes": ["torch", "torch-compile"], "batch_sizes": [32]})
    result, report = run_ok(job)
    m = result["metrics"]
    print(json.dumps(m["ratios"]), report["notes"])
    from worker.engine.formats.pt2 import register_quantized_ops

    register_quantized_ops()
    ep = torch.export.load(str(job / "out" / "model.pt2"))
    state = {**ep.state_dict, **ep.constants}
    assert any(t.dtype == torch.int8 and t.ndim >= 2 for t in state.values())
    # the fp32 weights convert_pt2e leaves behind are gone: no float tensor of a quantized layer's shape remains
    assert not any(t.dtype == torch.float32 and tuple(t.shape) == (64, 512) for t in state.values())
    assert m["compressed"]["agreement"] >= 0.99
    assert set(m["compressed"]["latency_ms"]) == {"torch", "torch-compile"}
    assert set(m["original"]["latency_ms"]) == {"torch", "torch-compile"}


def test_dynamic_int8_transformer_to_onnx(tmp_path, digits):
    x_train, y_train, x_test, y_test = digits
    bert = mz.build_tiny_bert(epochs=2)
    model = mz.write_hf_zip(bert, tmp_path / "bert.zip")
    eval_ds = mz.write_npz(tmp_path / "eval.npz", {"input_ids": mz.digits_tokens(x_test)}, y_test)
    job = make_job(tmp_path, model, "hf", [{"type": "quantize", "method": "dynamic_int8"}],
                   datasets={"eval": eval_ds}, evaluate={"runtimes": ["onnxruntime"]})
    result, report = run_ok(job)
    m = result["metrics"]
    print(json.dumps(m["ratios"]), report["notes"], report["steps"][0]["notes"])
    proto = onnx.load(str(job / "out" / "model.onnx"))
    assert "MatMulInteger" in {n.op_type for n in proto.graph.node}
    assert m["compressed"]["agreement"] >= 0.98
    # This 22k-parameter BERT's graph structure alone is ~15 KB of its 60 KB int8 ONNX, and the original is a
    # deflated zip: far from the ~4x a real-sized transformer gets, but the weights must be int8.
    weights = [i for i in proto.graph.initializer if len(i.dims) >= 2 and i.data_type != onnx.TensorProto.INT64]
    int8_bytes = sum(int(np.prod(i.dims)) for i in weights if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    float_bytes = sum(4 * int(np.prod(i.dims)) for i in weights if i.data_type == onnx.TensorProto.FLOAT)
    assert int8_bytes > 1.5 * float_bytes
    assert m["ratios"]["size"] >= 1.3
    # The position table the exporter folds into a constant feeds an Add, which ORT does not quantize: it is stored
    # as int8 + DequantizeLinear, so no float matrix of 1024+ values is left.
    big_float = [i.name for i in weights if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) >= 1024]
    assert not big_float, big_float
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    assert any("DequantizeLinear" in note for note in report["steps"][0]["notes"] + report["notes"]), report
    # The weights are in the range this host's int8 kernels compute exactly (7 bits without VNNI), so the file
    # gives here what exact integer arithmetic gives.
    from worker.engine.cpu import host_flags
    from worker.engine.passes.quantize.int8_kernel import int8_kernel

    assert report["steps"][0]["int8_kernel"] == int8_kernel(host_flags())
    tokens = mz.digits_tokens(x_test)
    exact = tmp_path / "exact.onnx"
    onnx.save(_exact_matmul_integer(proto), str(exact))
    np.testing.assert_allclose(onnx_predict(job / "out" / "model.onnx", tokens), onnx_predict(exact, tokens),
                               rtol=1e-4, atol=1e-3)


def _exact_matmul_integer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with each MatMulInteger(a, b, a_zero, b_zero) computed as an int32 MatMul of (a - a_zero) and
    (b - b_zero): what a non-saturating (VNNI) int8 kernel gives, on any CPU."""
    from onnx import helper

    proto = copy.deepcopy(proto)
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "MatMulInteger":
            nodes.append(node)
            continue
        operands = []
        for i, zero in ((0, 2), (1, 3)):
            name = f"{node.name}_exact_{i}"
            nodes.append(helper.make_node("Cast", [node.input[i]], [name], to=onnx.TensorProto.INT32))
            if len(node.input) > zero and node.input[zero]:
                nodes.append(helper.make_node("Cast", [node.input[zero]], [name + "_zero"],
                                              to=onnx.TensorProto.INT32))
                nodes.append(helper.make_node("Sub", [name, name + "_zero"], [name + "_centered"]))
                name += "_centered"
            operands.append(name)
        nodes.append(helper.make_node("MatMul", operands, list(node.output), name=node.name))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


@pytest.mark.parametrize("flags,machine,reduce_range", [
    ({"sse4_2", "avx", "avx2", "fma"}, "x86_64", True),                        # AVX2-only (AMD Zen 1-3, Haswell)
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),                         # AVX-512 without VNNI (Skylake-SP)
    ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "x86_64", False),         # Cascade Lake+, AMD Zen 4+
    ({"avx2", "avx_vnni"}, "x86_64", False),                                   # Alder Lake, Sierra Forest
    ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "x86_64", False),         # Sapphire Rapids
    ({"avx2", "amx_int8"}, "x86_64", False),
    (None, "x86_64", True),                                                    # flags unreadable: assume no VNNI
    ({"fp", "asimd", "asimddp"}, "aarch64", False),                            # ARM: no int16 saturation
])
def test_int8_kernel_follows_the_cpu_features(flags, machine, reduce_range):
    from worker.engine.passes.quantize.int8_kernel import int8_kernel, int8_kernel_note

    kernel = int8_kernel(None if flags is None else frozenset(flags), machine)
    assert set(kernel) == {"cpu_features", "vnni", "reduce_range", "reason"}
    assert kernel["reduce_range"] is reduce_range
    assert kernel["vnni"] == bool(flags and {"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    assert kernel["cpu_features"] == [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
                                      if flags and f in flags]
    note = int8_kernel_note(kernel)
    assert ("7-bit weights (reduce_range)" in note) == reduce_range and kernel["reason"] in note
    assert json.loads(json.dumps(kernel)) == kernel  # fits a JSON report as is


def test_cpu_flags_are_read_from_cpuinfo_text():
    from worker.engine.cpu import host_flags, parse_flags

    x86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
           "flags\t\t: fpu sse4_2 avx avx2 fma\nbugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert parse_flags(x86) == {"fpu", "sse4_2", "avx", "avx2", "fma"}  # the first processor's
    assert parse_flags("processor\t: 0\nFeatures\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}
    assert parse_flags("processor\t: 0\n") is None
    flags = host_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags == parse_flags(Path("/proc/cpuinfo").read_text(errors="replace"))


def _int8_weight_range(proto: onnx.ModelProto, op_types: set[str]) -> int:
    """The largest |value| of the int8 weights the given ops read (directly or through a DequantizeLinear)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2}
    producers = {out: n for n in proto.graph.node for out in n.output}
    found = []
    for node in proto.graph.node:
        if node.op_type not in op_types:
            continue
        for name in node.input:
            dq = producers.get(name)
            name = dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else name
            if name in inits:
                found.append(int(np.abs(numpy_helper.to_array(inits[name]).astype(np.int32)).max()))
    assert found, op_types
    return max(found)


def test_int8_kernel_choice_is_exact_where_chosen(tmp_path, digits, cnn):
    """On every host: 7-bit weights (the choice without VNNI) compute what exact integer arithmetic computes, and
    8-bit weights (the choice with VNNI) do so exactly where this host has VNNI; on an x86 host without it they
    saturate. Dynamic int8 on the tests' tiny BERT; static QDQ on the CNN with its first conv in int8 (fused
    kernels against ONNX Runtime's QDQ fusion turned off: DequantizeLinear, float op, QuantizeLinear)."""
    import onnxruntime as ort

    from worker.engine.cpu import host_flags
    from worker.engine.formats import LoadedModel, get_format
    from worker.engine.passes.quantize import onnx_nodes
    from worker.engine.passes.quantize import ort as ort_quant
    from worker.engine.passes.quantize.int8_kernel import int8_kernel

    host = int8_kernel(host_flags())
    seven, eight = int8_kernel({"avx2"}, "x86_64"), int8_kernel({"avx512_vnni"}, "x86_64")
    _, _, x_test, _ = digits
    tokens = mz.digits_tokens(x_test)
    bert = mz.build_tiny_bert(epochs=2)
    fp32 = tmp_path / "bert.onnx"
    get_format("hf").export(LoadedModel("hf", tmp_path / "bert.zip", bert.eval()), "onnx", fp32, [tokens])
    errors = {}
    for label, kernel in (("7-bit", seven), ("8-bit", eight)):
        work = tmp_path / label
        work.mkdir()
        model, _ = ort_quant.quantize_dynamic(onnx.load(str(fp32)), per_channel=True, exclude=[], workdir=work,
                                              keep_norm=True, kernel=kernel)
        assert _int8_weight_range(model, {"MatMulInteger"}) == (64 if kernel["reduce_range"] else 127)
        onnx.save(model, str(work / "int8.onnx"))
        onnx.save(_exact_matmul_integer(model), str(work / "exact.onnx"))
        errors[label] = float(np.abs(onnx_predict(work / "int8.onnx", tokens)
                                     - onnx_predict(work / "exact.onnx", tokens)).max())
    print("dynamic, max |int8 - exact|:", errors, "host:", host)
    assert errors["7-bit"] <= 1e-3
    assert (errors["8-bit"] <= 1e-3) == (not host["reduce_range"]), (errors, host)

    images, calibration = mz.as_images(x_test), mz.as_images(digits[0][:256])
    fp32 = mz.export_onnx(cnn, images, tmp_path / "cnn.onnx")
    proto = onnx.load(str(fp32))
    onnx_nodes.name_nodes(proto)
    head = [node.name for node, _ in onnx_nodes.weight_nodes(proto)][-1]

    def run(path: Path, fused: bool) -> np.ndarray:
        options = ort.SessionOptions()
        if not fused:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: images})[0]

    errors = {}
    for label, kernel in (("7-bit", seven), ("8-bit", eight)):
        work = tmp_path / f"static-{label}"
        work.mkdir()
        model, _, _ = ort_quant.quantize_static(copy.deepcopy(proto), [calibration], calibration="minmax",
                                                per_channel=True, exclude=[head], workdir=work, keep_norm=True,
                                                kernel=kernel)
        assert _int8_weight_range(model, {"Conv", "Gemm", "MatMul"}) == (64 if kernel["reduce_range"] else 127)
        onnx.save(model, str(work / "int8.onnx"))
        errors[label] = float(np.abs(run(work / "int8.onnx", True) - run(work / "int8.onnx", False)).max())
    # Fused and unfused int8 differ by requantization rounding (a few hundredths here); saturation by units.
    print("static, max |fused - unfused|:", errors, "host:", host)
    assert errors["7-bit"] <= 0.2
    assert (errors["8-bit"] <= 0.2) == (not host["reduce_range"]), (errors, host)


def test_the_step_report_records_the_int8_kernel_choice(tmp_path, zoo):
    """The quantize step reports the CPU features it saw and the weight range it chose for them, and the ONNX
    output has weights of that range."""
    from worker.engine.cpu import host_flags
    from worker.engine.passes.quantize.int8_kernel import int8_kernel

    job = make_job(tmp_path, zoo["onnx"], "onnx", [{"type": "quantize", "method": "dynamic_int8"}],
                   datasets={"eval": zoo["eval"]})
    _, report = run_ok(job)
    step = report["steps"][0]
    expected = int8_kernel(host_flags())
    assert step["int8_kernel"] == expected
    assert any(n.startswith("int8 kernels (ONNX Runtime): CPU features ") and expected["reason"] in n
               for n in step["notes"]), step["notes"]
    proto = onnx.load(str(job / "out" / "model.onnx"))
    assert _int8_weight_range(proto, {"MatMulInteger"}) == (64 if expected["reduce_range"] else 127)
    from app.report_schema import validate_report

    validate_report(report)


def test_dynamic_int8_package_stays_a_package(tmp_path, zoo, digits, mlp):
    job = make_job(tmp_path, zoo["package"], "package", [{"type": "quantize", "method": "dynamic_int8"}],
                   outputs=["package"], datasets={"eval": zoo["eval"]})
    result, report = run_ok(job)
    m = result["metrics"]
    with zipfile.ZipFile(job / "out" / "model.zip") as zf:
        manifest = json.loads(zf.read("quantization.json"))
        from safetensors.torch import load as load_tensors

        weights = load_tensors(zf.read("weights.safetensors"))
    assert manifest["method"] == "dynamic_int8" and manifest["modules"] == ["0", "2"]  # the logits layer stays float
    assert weights["0.weight"].dtype == torch.int8 and weights["4.weight"].dtype == torch.float32
    assert m["compressed"]["agreement"] >= 0.98
    layers = {layer["name"]: layer["bits"] for layer in report["layers"]}
    assert layers == {"0.weight": 8, "2.weight": 8, "4.weight": 32}


@pytest.mark.parametrize("method,bits", [("weight_int8", 8), ("weight_int4", 4)])
def test_torchao_weight_only_package(tmp_path, zoo, method, bits):
    step = {"type": "quantize", "method": method, "keep_float": []}
    if method == "weight_int4":
        step["group_size"] = 32
    job = make_job(tmp_path, zoo["package"], "package", [step], datasets={"eval": zoo["eval"]})
    result, report = run_ok(job)
    m = result["metrics"]
    print(method, json.dumps(m["ratios"]))
    with zipfile.ZipFile(job / "out" / "model.zip") as zf:
        manifest = json.loads(zf.read("quantization.json"))
    assert manifest["method"] == method and set(manifest["modules"]) == {"0", "2", "4"}
    assert m["ratios"]["size"] >= (3.0 if bits == 8 else 4.0)
    assert m["compressed"]["agreement"] >= (0.98 if bits == 8 else 0.9)


def test_binary_mlp_compact_storage(tmp_path, zoo):
    from worker.engine.compact import load_compact, read_manifest

    job = make_job(tmp_path, zoo["pt2"], "pt2", [{"type": "quantize", "method": "binary"}],
                   datasets={"eval": zoo["eval"]})
    result, report = run_ok(job)
    m = result["metrics"]
    print(json.dumps(m["ratios"]), m["compressed"]["accuracy"], m["original"]["size_bytes"],
          m["compressed"]["safetensors_size_bytes"])
    path = job / "out" / "model.safetensors"
    manifest = read_manifest(path)
    layouts = {n: e["layout"] for n, e in manifest["tensors"].items() if len(e["shape"]) >= 2}
    assert set(layouts.values()) == {"binary"}, layouts
    for name, w in load_compact(path).items():
        if w.ndim >= 2:  # each row is +-one scale
            assert (np.abs(w) == np.abs(w[:, :1])).all()
    assert m["ratios"]["safetensors_size"] >= 15
    assert any("storage format" in n for n in report["steps"][0]["notes"])


def test_static_int8_on_onnx_input_quantizes_the_graph(tmp_path, zoo, digits):
    x_train = digits[0]
    cal = mz.write_npz(tmp_path / "cal.npz", x_train[:256])
    job = make_job(tmp_path, zoo["onnx"], "onnx",
                   [{"type": "quantize", "method": "static_int8", "calibration": "entropy", "keep_float": []}],
                   datasets={"calibration": cal, "eval": zoo["eval"]})
    result, report = run_ok(job)
    proto = onnx.load(str(job / "out" / "model.onnx"))
    assert len([i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]) == 3
    assert result["metrics"]["compressed"]["agreement"] >= 0.97


def test_static_int8_without_calibration_data_is_a_clear_error(tmp_path, zoo):
    job = make_job(tmp_path, zoo["package"], "package", [{"type": "quantize", "method": "static_int8"}])
    rc, lines, err = run_sandbox(job)
    end = final(lines)
    assert rc == 2 and end["code"] == "bad_dataset" and "calibration" in end["message"]


@pytest.mark.parametrize("fmt,step,outputs,field", [
    ("pt2", {"method": "weight_int4"}, None, "steps[0].method"),
    ("onnx", {"method": "weight_int8"}, None, "steps[0].method"),
    ("package", {"method": "static_int8"}, ["package"], "outputs[0]"),
    ("package", {"method": "weight_int8"}, ["onnx"], "outputs[0]"),
    ("hf", {"method": "dynamic_int8"}, ["hf"], "outputs[0]"),
    ("package", {"method": "binary", "group_size": 32}, None, "steps[0]"),
])
def test_impossible_quantize_recipes_are_refused(fmt, step, outputs, field):
    from app.recipes import RecipeError, check_against_format, parse_recipe

    with pytest.raises(RecipeError) as info:
        check_against_format(parse_recipe({"steps": [{"type": "quantize", **step}], "outputs": outputs}), fmt)
    assert any(e["field"] == field for e in info.value.errors), info.value.errors


def test_quantize_must_be_last_and_presets_resolve():
    from app.recipes import RecipeError, check_against_format, parse_recipe

    with pytest.raises(RecipeError) as info:
        check_against_format(parse_recipe({"steps": [{"type": "quantize"}, {"type": "prune", "sparsity": 0.5}],
                                           "outputs": ["onnx"]}), "package")
    assert info.value.errors[0]["field"] == "steps[0]"
    assert check_against_format(parse_recipe("int8"), "package") == ["onnx"]
    assert check_against_format(parse_recipe("int8-dynamic"), "hf") == ["onnx"]
    assert check_against_format(parse_recipe("int4-weights"), "package") == ["package"]


def test_pt2e_handles_a_relu_module_shared_by_two_calls():
    """The ResNet's blocks call one nn.ReLU twice: without splitting its partition the X86 quantizer raises
    'Input partition has more than one output node'."""
    from worker.engine.passes.quantize import pt2e

    net = mz.build_from_source(mz.RESNET_SOURCE).eval()
    x = torch.rand(4, 1, mz.RESNET_SIZE, mz.RESNET_SIZE)
    gm = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    ep, facts = pt2e.quantize(gm, (x[:2],), True, [x.numpy()], calibration="minmax", per_channel=True,
                              float_modules=["fc"])
    assert len(facts["int8_weights"]) == 9  # every conv; the head kept float
    assert "fc.weight" in ep.state_dict and ep.state_dict["fc.weight"].dtype == torch.float32
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(ep.module()(x), net(x)).min() > 0.99


@pytest.mark.parametrize("asked,timed", [(1, 1), (16, 2)])
def test_evaluate_threads_sets_the_timing_threads_and_is_capped_by_the_sandbox(tmp_path, zoo, asked, timed):
    job = make_job(tmp_path, zoo["onnx"], "onnx", [{"type": "quantize", "method": "dynamic_int8"}],
                   datasets={"eval": zoo["eval"]}, evaluate={"threads": asked})
    result, report = run_ok(job)
    environment = report["environment"]
    assert result["metrics"]["run"]["environment"] == environment
    assert (environment["threads"], environment["timing_threads"]) == (2, timed)
    assert any("capped" in n for n in report["notes"]) == (asked > 2), report["notes"]
    assert "onnxruntime" in result["metrics"]["compressed"]["latency_ms"]


def test_evaluate_threads_below_one_is_refused():
    from app.recipes import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match=r"evaluate\.threads: Input should be greater than or equal to 1"):
        parse_recipe({"steps": [{"type": "prune", "sparsity": 0.5}], "evaluate": {"threads": 0}})


def test_pad_input_channels_keeps_the_float_model_and_the_stem_runs_as_an_int8_conv(tmp_path, digits,
                                                                                      untrained_resnet_onnx):
    """A 1-channel stem zero-padded to 4 input channels computes the same; quantized with it, every conv of the
    graph ONNX Runtime runs is an int8 QLinearConv."""
    from worker.engine.passes.quantize import onnx_nodes, onnx_rewrites
    from worker.engine.passes.quantize import ort as ort_quant

    fp32, images = untrained_resnet_onnx
    proto = onnx.load(str(fp32))
    onnx_nodes.name_nodes(proto)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    stem, inner = convs[0].name, convs[1].name
    # Only named convs that read a graph input with < 4 channels are padded.
    assert onnx_rewrites.pad_input_channels(proto, [inner]) == []
    pads = onnx_rewrites.pad_input_channels(proto, [stem, inner])
    assert pads == [stem + "_pad_channels"]
    weights = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    stem_node = next(n for n in proto.graph.node if n.name == stem)
    assert weights[stem_node.input[1]][1] == onnx_rewrites.PADDED_CHANNELS
    assert next(n for n in proto.graph.node if n.name == pads[0]).op_type == "Pad"
    onnx.save(proto, str(tmp_path / "padded.onnx"))
    before, after = (onnx_predict(p, images) for p in (fp32, tmp_path / "padded.onnx"))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)  # zero weights on zero inputs: exact

    head = [node.name for node, _ in onnx_nodes.weight_nodes(proto)][-1]
    quantized, _, _ = ort_quant.quantize_static(proto, [mz.as_resnet_input(digits[0][:128])], calibration="minmax",
                                                per_channel=True, exclude=[head, *pads], workdir=tmp_path,
                                                keep_norm=True)
    onnx.save(quantized, str(tmp_path / "int8.onnx"))
    ops = _ort_optimized_ops(tmp_path / "int8.onnx", tmp_path)
    assert ops.count("QLinearConv") == len(convs) and "Conv" not in ops, ops


def test_prefer_quantized_first_layer_rule():
    from worker.engine.passes.quantize.ort import prefer_quantized

    assert prefer_quantized(2.70, 2.50, 1.0, 1.0)          # 8% faster, same agreement
    assert not prefer_quantized(2.70, 2.65, 1.0, 1.0)      # 2%: within timing noise, keep the default
    assert not prefer_quantized(0.15, 0.16, 1.0, 1.0)      # slower
    assert not prefer_quantized(2.70, 2.00, 0.99, 0.98)    # faster but a point less agreement
    assert prefer_quantized(2.70, 2.00, 0.99, 0.986)       # within half a point


def test_static_int8_onnx_tries_the_first_layer_quantized_and_reports_what_it_kept(tmp_path, digits):
    """static_int8 on an ONNX model, first layer kept float by default: the step times the graph with the stem in
    int8 too and keeps the faster; whichever it kept, the report's layer table and the file agree."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits
    net = mz.train_resnet(epochs=1)
    model = mz.export_onnx(net, mz.as_resnet_input(x_test), tmp_path / "resnet.onnx")
    cal = mz.write_npz(tmp_path / "cal.npz", mz.as_resnet_input(x_train[:256]))
    eval_ds = mz.write_npz(tmp_path / "eval.npz", mz.as_resnet_input(x_test), y_test)
    job = make_job(tmp_path, model, "onnx", [{"type": "quantize", "method": "static_int8"}],
                   datasets={"calibration": cal, "eval": eval_ds})
    result, report = run_ok(job)
    step = report["steps"][0]
    lines = [n for n in step["notes"] if n.startswith("first layer(s) ['stem.0.weight']: ")]
    assert len(lines) == 1, step["notes"]
    quantized_first = ": quantized (input channels zero-padded to 4): " in lines[0]
    assert quantized_first or ": kept float: " in lines[0]
    bits = {layer["name"]: layer["bits"] for layer in result["metrics"]["layers"]}
    assert bits["stem.0.weight"] == (8 if quantized_first else 32) and bits["fc.weight"] == 32
    assert any(k["name"] == "stem.0.weight" for k in step["kept_float"]) != quantized_first
    proto = onnx.load(str(job / "out" / "model.onnx"))
    int8 = {i.name: tuple(i.dims) for i in proto.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2}
    stem = [dims for name, dims in int8.items() if name.startswith("stem.0.weight")]
    assert stem == ([(24, 4, 3, 3)] if quantized_first else []), int8
    assert result["metrics"]["compressed"]["agreement"] >= 0.98


def test_finalize_marks_the_first_layer_the_onnx_output_quantized():
    from app.recipes import QuantizeSpec
    from worker.engine.passes import Pass
    from worker.engine.passes.quantize import Quantize
    from worker.engine.passes.quantize.plan import QuantPlan

    spec = QuantizeSpec(type="quantize", method="static_int8")
    plan = QuantPlan(spec=spec, source=None, layers=["a", "b"], quantized=["b"], kept={"a": "first layer"},
                     first_by_default=["a"])
    plan.onnx_first_quantized = ["a"]
    step = Quantize()
    step.plan = plan

    def report() -> dict:
        return {"type": "quantize", "quantized_layers": 1, "kept_float": [{"name": "a", "reason": "first layer"}],
                "layers": [{"name": "a", "bits": 32, "quantized": False, "kept_float": "first layer"},
                           {"name": "b", "bits": 8, "quantized": True}]}

    amended = report()
    step.finalize(amended, ["onnx"])
    assert amended["layers"][0] == {"name": "a", "bits": 8, "quantized": True}
    assert amended["kept_float"] == [] and amended["quantized_layers"] == 2
    both = report()
    step.finalize(both, ["onnx", "pt2"])
    assert both["layers"][0]["bits"] == 8 and "pt2 output only" in both["layers"][0]["kept_float"]
    plan.onnx_first_quantized = []
    untouched = report()
    step.finalize(untouched, ["onnx"])
    assert untouched == report()
    unplanned = report()
    Quantize().finalize(unplanned, ["onnx"])  # a step that planned nothing leaves its report alone
    Pass().finalize(unplanned, ["onnx"])
    assert unplanned == report()


def test_every_method_has_one_registered_handler():
    from typing import get_args

    from app.recipes import QuantizeSpec
    from app.recipes.steps import LLM_METHODS
    from worker.engine.errors import EngineError
    from worker.engine.passes.quantize import LLM_CAPABLE
    from worker.engine.passes.quantize.methods import METHODS, handler_for, method

    # Every method has a handler, but those only causal LMs take (llm-compressor: worker/engine/llm/steps.py).
    every = set(get_args(QuantizeSpec.model_fields["method"].annotation))
    assert sorted(METHODS) == sorted(every - set(LLM_METHODS)) and set(LLM_METHODS) <= set(LLM_CAPABLE) <= every
    assert {name: cls.bits for name, cls in METHODS.items()} == {
        "static_int8": 8, "dynamic_int8": 8, "weight_int8": 8, "weight_int4": 4, "binary": 1}
    with pytest.raises(RuntimeError, match="already has a handler"):
        method("binary")(METHODS["binary"])
    with pytest.raises(EngineError) as err:
        handler_for("ternary")
    assert err.value.code == "unsupported"


def _quantize_cnn_with_first_layer_trial(cnn, digits, workdir: Path):
    """The trained CNN as fp32 ONNX, static int8 with its stem conv left float by the default (so tried in int8
    too, timed at one thread and batch 32) -> quantize_static's StaticInt8."""
    from worker.engine.passes.quantize import onnx_nodes
    from worker.engine.passes.quantize import ort as ort_quant

    x_train, _, x_test, _ = digits
    proto = onnx.load(str(mz.export_onnx(cnn, mz.as_images(x_test), workdir / "cnn.onnx")))
    onnx_nodes.name_nodes(proto)
    first = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    return ort_quant.quantize_static(
        proto, [mz.as_images(x_train[:64])], calibration="minmax", per_channel=True, exclude=[first],
        workdir=workdir, keep_norm=True, first_layers={first: "0.weight"}, timing=(1, 32))


def test_first_layer_trial_is_skipped_for_a_model_over_the_memory_bound(tmp_path, cnn, digits, monkeypatch):
    from worker.engine.passes.quantize import ort as ort_quant

    monkeypatch.setattr(ort_quant, "FIRST_LAYER_TRIAL_MAX_BYTES", 1024)
    model, notes, first_quantized = _quantize_cnn_with_first_layer_trial(cnn, digits, tmp_path)
    assert first_quantized == []
    assert any(n.startswith("first layer(s) ['0.weight']: kept float, not timed in int8") for n in notes), notes
    assert not (tmp_path / "quantize-int8-first.onnx").exists()
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert any(w in {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
               for w in conv_weights)  # the first conv reads its float weight directly


def test_a_first_layer_variant_that_fails_leaves_the_default_result(tmp_path, cnn, digits, monkeypatch):
    """The trial is an optimisation: a variant ONNX Runtime cannot quantize (here: a graph made invalid on
    purpose) is noted and the default int8 graph is returned, not an error."""
    from worker.engine.passes.quantize import ort as ort_quant

    def broken_padding(model, nodes, shapes=None):
        next(n for n in model.graph.node if n.name == nodes[0]).input[0] = "no_such_tensor"
        return []

    monkeypatch.setattr(ort_quant, "pad_input_channels", broken_padding)
    model, notes, first_quantized = _quantize_cnn_with_first_layer_trial(cnn, digits, tmp_path)
    assert first_quantized == []
    assert any(n.startswith("first layer(s) ['0.weight']: kept float; the int8 variant could not be measured")
               for n in notes), notes
    assert ort_quant.int8_weights(model)
    onnx.save(model, str(tmp_path / "int8.onnx"))
    out = onnx_predict(tmp_path / "int8.onnx", mz.as_images(digits[2][:32]))
    assert out.shape == (32, 10)
