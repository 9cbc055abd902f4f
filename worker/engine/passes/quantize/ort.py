"""ONNX Runtime quantization of an ONNX graph: static (QDQ, uint8 activations, int8 weights) and dynamic int8.

Static QDQ with uint8 activations and int8 per-channel weights is the form measured fast on x86 CPUs (bench/RESULTS.md:
CNN 2.7x, ResNet 2.8x faster than fp32 at batch 64); int8 activations gave no speed-up. Dynamic int8 quantizes
MatMul/Gather/LSTM/Attention: convolutions stay float, because ORT's ConvInteger is slower than a float conv.
Both quantize weights to 7 bits instead of 8 on an x86 CPU without VNNI, where ORT's int8 kernels would saturate
(int8_kernel.py).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.engine.errors import EngineError
from worker.engine.passes.quantize.int8_kernel import host_int8_kernel
from worker.engine.passes.quantize.onnx_nodes import NORM_OPS, name_nodes
from worker.engine.passes.quantize.onnx_rewrites import (PADDED_CHANNELS, _readers, flatten_channels_last,
                                                         gemm_to_matmul, known_shapes, pad_input_channels,
                                                         spatial_mean_to_global_pool, strip_debug_info)
from worker.engine.shared.data import calibration_chunks, fixed_batch_hint

_CALIBRATION_BATCH = 32


@contextlib.contextmanager
def _tempdir(workdir: Path) -> Iterator[None]:
    """ONNX Runtime's quantizer writes temporary models: keep them in the job's work folder."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(workdir)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _inputs(proto: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def fixed_input_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size the graph's first input is frozen to, or None when its batch dim is dynamic or unknown."""
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        return int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 \
            else None
    return None


class _Reader:
    """Calibration batches for quantize_static, the arrays in the model's input order; a fixed-batch graph gets
    batches of its size (the last one padded by repeating samples)."""

    def __init__(self, names: list[str], arrays: list[np.ndarray], fixed_batch: int | None = None):
        chunks = calibration_chunks(arrays, fixed_batch or _CALIBRATION_BATCH, fixed_batch is not None)
        self._batches = iter([dict(zip(names, chunk)) for chunk in chunks])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # not needed: each calibration makes a new reader
        pass


class StaticInt8(NamedTuple):
    model: onnx.ModelProto
    notes: list[str]
    first_quantized: list[str]  # of the `first_layers` layers, those quantized after all (by measurement)


def quantize_static(proto: onnx.ModelProto, arrays: list[np.ndarray], *, calibration: str, per_channel: bool,
                    exclude: list[str], workdir: Path, keep_norm: bool, first_layers: dict[str, str] | None = None,
                    timing: tuple[int, int] | None = None, kernel: dict | None = None) -> StaticInt8:
    """Static QDQ int8 of `proto` calibrated on `arrays`, in the weight range that `kernel` (int8_kernel; default:
    this host's) chooses.

    `first_layers`: node -> layer, for nodes of `exclude` left float only by the default for the layers that read
    the model input.
    With `timing` (threads, batch: how the job times its result), the graph is also quantized with those layers
    in int8 too (a conv's few input channels padded, pad_input_channels), both versions are timed on ONNX
    Runtime, and the faster one is kept unless it agrees less with the float model (_faster_of)."""
    notes = []
    name_nodes(proto)
    shapes = known_shapes(proto)
    pooled = spatial_mean_to_global_pool(proto, shapes)
    if pooled:
        notes.append(f"onnxruntime: {pooled} spatial mean(s) rewritten as GlobalAveragePool, which has an int8 kernel")
    reordered = flatten_channels_last(proto, shapes)
    if reordered:
        notes.append(f"onnxruntime: {reordered} flatten(s) of a conv feature map made channels-last (the next layer's "
                     "weight columns permuted to match) so the int8 graph needs no layout transpose there")
    kernel = host_int8_kernel() if kernel is None else kernel
    options = {"calibration": calibration, "per_channel": per_channel, "workdir": workdir, "keep_norm": keep_norm,
               "reduce_range": kernel["reduce_range"]}
    trial = [n for n in (first_layers or {}) if n in exclude]
    result, more = _qdq(proto, arrays, exclude, "int8", **options)
    notes += more
    if not trial or timing is None:
        return StaticInt8(result, notes, [])
    names = sorted({first_layers[n] for n in trial})
    weight_bytes = sum(int(np.prod(i.dims)) * helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
                       for i in proto.graph.initializer)
    if weight_bytes > FIRST_LAYER_TRIAL_MAX_BYTES:
        notes.append(f"first layer(s) {names}: kept float, not timed in int8: the trial "
                     f"holds the model three more times in memory and this one has {weight_bytes >> 20} MiB of "
                     "weights")
        return StaticInt8(result, notes, [])
    try:  # an optimisation: whatever goes wrong in it, the default result stands
        padded_model = copy.deepcopy(proto)
        pads = pad_input_channels(padded_model, trial, shapes)
        alt, _ = _qdq(padded_model, arrays, [e for e in exclude if e not in trial] + pads, "int8-first", **options)
        use_alt, line = _faster_of(proto, result, alt, arrays, timing)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"first layer(s) {names}: kept float; the int8 variant could not be measured "
                     f"({type(exc).__name__}: {str(exc)[:300]})")
        return StaticInt8(result, notes, [])
    padded = f" (input channels zero-padded to {PADDED_CHANNELS})" if pads else ""
    notes.append(f"first layer(s) {names}: {'quantized' + padded if use_alt else 'kept float'}: {line}")
    return StaticInt8(alt, notes, names) if use_alt else StaticInt8(result, notes, [])


def _qdq(proto: onnx.ModelProto, arrays: list[np.ndarray], exclude: list[str], tag: str, *, calibration: str,
         per_channel: bool, workdir: Path, keep_norm: bool, reduce_range: bool) -> tuple[onnx.ModelProto, list[str]]:
    """ONNX Runtime's pre-processing and static QDQ quantization of `proto` (files named after `tag`); 7-bit
    weights with `reduce_range` (int8_kernel)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    notes = []
    src = workdir / f"quantize-{tag}-fp32.onnx"
    onnx.save(proto, str(src))
    pre = workdir / f"quantize-{tag}-pre.onnx"
    try:  # shape inference + graph optimisation, as ONNX Runtime recommends before quantizing
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with _tempdir(workdir):
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        source = pre
    except Exception as exc:  # noqa: BLE001  (optional step)
        notes.append(f"onnxruntime: pre-processing skipped ({type(exc).__name__})")
        source = src
    # ONNX Runtime's own default set: the QDQ ops and those with a QLinear kernel (Add, GlobalAveragePool,
    # Concat, ...). With the QDQ ops alone, a residual Add whose output leaves the int8 region ran in float, and
    # the graph dequantized before it (the trained bench ResNet, b32, two threads: int8 5.21-5.25 -> 4.80-4.81 ms
    # with this and spatial_mean_to_global_pool, fp32 9.49-9.59 ms; medians of 40 interleaved blocks of 5 runs,
    # twice).
    op_types = sorted(op for op in set(QDQRegistry) | set(QLinearOpsRegistry) if not (keep_norm and op in NORM_OPS))
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    out = workdir / f"quantize-{tag}.onnx"
    graph = onnx.load(str(source), load_external_data=False)
    names = _inputs(graph)
    try:
        with _tempdir(workdir):
            ort_quantize_static(str(source), str(out), _Reader(names, arrays, fixed_input_batch(graph)),
                                quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, reduce_range=reduce_range, calibrate_method=method,
                                op_types_to_quantize=op_types, nodes_to_exclude=exclude)
    except Exception as exc:
        raise EngineError("unsupported", fixed_batch_hint(f"onnxruntime static quantization failed: "
                                                          f"{type(exc).__name__}: {str(exc)[:500]}")) from exc
    result = onnx.load(str(out))
    strip_debug_info(result)
    return result, notes


# Quantizing the first layer is kept only when it measured this much faster (timing noise on a busy worker is a
# few percent) and agreed with the float model on the calibration samples to within this many points.
FIRST_LAYER_MIN_SPEEDUP = 1.03
FIRST_LAYER_MAX_AGREEMENT_LOSS = 0.005
# Above this much weight the trial is skipped: it holds a copy of the float graph, a second int8 graph and three
# ONNX Runtime sessions at once, which a large model's sandbox memory limit (2 GiB + 6x the model) may not cover.
FIRST_LAYER_TRIAL_MAX_BYTES = 256 << 20


def _faster_of(reference: onnx.ModelProto, kept: onnx.ModelProto, quantized: onnx.ModelProto,
               arrays: list[np.ndarray], timing: tuple[int, int]) -> tuple[bool, str]:
    """Whether `quantized` (first layer int8) beats `kept` (first layer float): timed alternately on ONNX Runtime
    at the job's threads and batch, with its agreement (else cosine similarity) with the float `reference` on the
    calibration samples no more than FIRST_LAYER_MAX_AGREEMENT_LOSS worse. Returns it and the figures."""
    from worker.engine import metrics
    from worker.engine.formats import LoadedModel, get_format

    # The quantizer's calibration sessions may still hold their (spinning) threads until collected.
    gc.collect()
    fmt = get_format("onnx")
    threads, batch = timing
    models = [LoadedModel("onnx", Path("."), m) for m in (reference, kept, quantized)]
    fixed = fmt.fixed_batch(models[0])
    batch = fixed or batch
    runs = [fmt.runner(m, "onnxruntime", threads) for m in models]
    outputs = [metrics.predict(run, arrays, fixed) for run in runs]
    fid_kept, fid_quant = (metrics.fidelity(outputs[0], out) for out in outputs[1:])
    lat_kept, lat_quant = metrics.latency_pair(runs[1], runs[2], arrays, [batch], warmup=2, repeats=11,
                                               fixed_batch=fixed)
    ms_kept, ms_quant = lat_kept[str(batch)]["median"], lat_quant[str(batch)]["median"]
    key = "agreement" if fid_kept["agreement"] is not None else "cosine"
    line = (f"int8 {ms_quant} ms against {ms_kept} ms with it float (b{batch}, {threads} "
            f"thread{'s' if threads > 1 else ''}, medians of 11 alternating runs); {key} with the float model on "
            f"{arrays[0].shape[0]} calibration samples {fid_quant[key]} against {fid_kept[key]}")
    return prefer_quantized(ms_kept, ms_quant, fid_kept[key], fid_quant[key]), line


def prefer_quantized(ms_kept: float, ms_quant: float, fidelity_kept: float, fidelity_quant: float) -> bool:
    """The rule of _faster_of: faster by FIRST_LAYER_MIN_SPEEDUP, and agreeing with the float model no more than
    FIRST_LAYER_MAX_AGREEMENT_LOSS less."""
    return (ms_quant * FIRST_LAYER_MIN_SPEEDUP <= ms_kept
            and fidelity_quant >= fidelity_kept - FIRST_LAYER_MAX_AGREEMENT_LOSS)


def quantize_dynamic(proto: onnx.ModelProto, *, per_channel: bool, exclude: list[str], workdir: Path,
                     keep_norm: bool, kernel: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Dynamic int8 (int8 weights, activations quantized per batch at run time) of MatMul/Gather/LSTM/Attention,
    in the weight range that `kernel` (int8_kernel; default: this host's) chooses."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    notes = []
    kernel = host_int8_kernel() if kernel is None else kernel
    name_nodes(proto)
    rewritten = gemm_to_matmul(proto)
    if rewritten:
        notes.append(f"onnxruntime: {rewritten} Gemm node(s) rewritten as MatMul + Add for dynamic quantization")
    op_types = ["MatMul", "Gather", "LSTM", "Attention"] + ([] if keep_norm else ["EmbedLayerNormalization"])
    if any(n.op_type == "Conv" for n in proto.graph.node):
        notes.append("dynamic_int8 leaves convolutions float: ONNX Runtime's ConvInteger is slower than a float "
                     "conv (bench/RESULTS.md); use static_int8 for convolutional models")
    src = workdir / "quantize-fp32.onnx"
    onnx.save(proto, str(src))
    out = workdir / "quantize-int8.onnx"
    try:
        with _tempdir(workdir):
            ort_quantize_dynamic(str(src), str(out), op_types_to_quantize=op_types, per_channel=per_channel,
                                 reduce_range=kernel["reduce_range"], weight_type=QuantType.QInt8,
                                 nodes_to_exclude=exclude)
    except Exception as exc:
        raise EngineError("unsupported", f"onnxruntime dynamic quantization failed: {type(exc).__name__}: "
                                         f"{str(exc)[:500]}") from exc
    result = onnx.load(str(out))
    stored = store_constants_int8(result, exclude, keep_norm)
    if stored:
        notes.append(f"onnxruntime: {len(stored)} other float constant(s) that no quantized op reads (e.g. a constant-folded "
                     f"position embedding) stored as int8 per row + DequantizeLinear: {stored[:5]}")
    strip_debug_info(result)
    return result, notes


# Smaller float constants (biases, scales, shapes) stay float: their int8 copy would save little and cost accuracy.
_MIN_STORED_CONSTANT = 1024


def store_constants_int8(proto: onnx.ModelProto, exclude: list[str], keep_norm: bool) -> list[str]:
    """Weight-only int8 storage for the float matrices dynamic quantization leaves behind (ORT quantizes the
    weights of MatMul/Gather, but not a constant that feeds an Add, such as the position embeddings the exporter
    folds into one table): each becomes an int8 initializer with a symmetric scale per row, and a DequantizeLinear
    node that rebuilds the float table when the model runs. Constants read by an excluded (kept-float) node, or by
    a normalization op with `keep_norm`, stay as they are. Returns the names stored."""
    graph = proto.graph
    readers = _readers(graph)
    graph_inputs = {i.name for i in graph.input}
    skip = set(exclude)
    stored, new_nodes, new_inits, keep = [], [], [], []
    for init in graph.initializer:
        users = readers.get(init.name, [])
        # A matrix, possibly under leading 1-sized dims (the exporter keeps [1, positions, hidden]).
        eligible = (init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2
                    and all(d == 1 for d in init.dims[:-2])
                    and int(np.prod(init.dims)) >= _MIN_STORED_CONSTANT and init.name not in graph_inputs and users
                    and not any(n.name in skip or (keep_norm and n.op_type in NORM_OPS) for n in users))
        if not eligible:
            keep.append(init)
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        rows = w.reshape(w.shape[-2], w.shape[-1])
        scale = np.abs(rows).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
        base = init.name
        new_inits += [numpy_helper.from_array(q, base + "_int8"),
                      numpy_helper.from_array(scale.astype(np.float32), base + "_int8_scale"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), base + "_int8_zero_point")]
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_int8", base + "_int8_scale",
                                                                base + "_int8_zero_point"], [base],
                                          name=base + "_dequantize", axis=len(init.dims) - 2))
        stored.append(base)
    if stored:
        del graph.initializer[:]
        graph.initializer.extend(keep + new_inits)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + nodes)  # constants first: the graph stays topologically sorted
    return stored


def int8_weights(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Initializers of 8-bit integer type with >= 2 dims (quantized weights): proof that quantization happened."""
    return {i.name: tuple(i.dims) for i in proto.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) >= 2}
