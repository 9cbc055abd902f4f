"""ONNX Runtime quantization of an ONNX graph: static (QDQ, uint8 activations, int8 weights) and dynamic int8.

Static QDQ with uint8 activations and int8 per-channel weights is the form measured fast on x86 CPUs (bench/RESULTS.md:
CNN 2.7x, ResNet 2.8x faster than fp32 at batch 64); int8 activations gave no speed-up. Dynamic int8 quantizes
MatMul/Gather/LSTM/Attention: convolutions stay float, because ORT's ConvInteger is slower than a float conv.
Both quantize weights to 7 bits instead of 8 on an x86 CPU without VNNI, where ORT's int8 kernels would saturate
(int8_kernel).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import platform
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.engine.errors import EngineError
from worker.engine.shared.data import calibration_chunks, fixed_batch_hint

NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
            "SimplifiedLayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"}
_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
_CALIBRATION_BATCH = 32
PADDED_CHANNELS = 4  # see pad_input_channels


def int8_kernel(flags: frozenset[str] | set[str] | None, machine: str | None = None) -> dict:
    """The int8 weight range to quantize with for a CPU with these flags (None: unknown) and architecture.

    ONNX Runtime's u8s8 kernels (uint8 activations x int8 weights, both quantizers' form here) are exact where the
    CPU has VNNI (avx512_vnni, avx_vnni) or AMX: products accumulate in int32. Without them, on x86, they use
    vpmaddubsw, which adds each pair of u8 x s8 products in a saturating int16: with 8-bit weights a pair can
    reach 2 x 255 x 128 and clips, and the quantized model drifts (measured on an AVX2-only EPYC: the tests'
    tiny BERT, dynamic int8, agreed 0.947 with the float model, 0.997 with exact arithmetic; a trained ResNet,
    static QDQ, 0.925 against 1.0). 7-bit weights (`reduce_range`, [-64, 64]) keep every pair in range
    (2 x 255 x 64 < 32768) on the same kernels, as fast (same ResNet, b32, one thread: 4.06 against 3.81 ms and
    4.97 against 5.12 ms, two runs); int8 activations (s8s8) were no cure (ONNX Runtime shifts them to u8 on x86:
    same drift, 1.8x slower) and uint8 weights (u8u8) were exact but 1.4x slower. So: 8-bit weights with VNNI/AMX
    or off x86, 7-bit on an x86 CPU without them (or whose flags cannot be read). Returns the step report's
    `int8_kernel`: {"cpu_features", "vnni", "reduce_range", "reason"}."""
    from worker.engine.cpu import VNNI_FEATURES, int8_features, is_x86

    features = int8_features(flags)
    vnni = sorted(VNNI_FEATURES & set(flags or ()))
    if not is_x86(machine):
        return {"cpu_features": features, "vnni": False, "reduce_range": False,
                "reason": f"not an x86 CPU ({machine or platform.machine()}): ONNX Runtime's int8 kernels there do "
                          "not saturate; 8-bit weights"}
    if vnni:
        return {"cpu_features": features, "vnni": True, "reduce_range": False,
                "reason": f"{'/'.join(vnni)}: ONNX Runtime's u8s8 kernels accumulate in int32, exact with 8-bit "
                          "weights (a model quantized so may drift on a CPU without VNNI)"}
    known = "CPU flags unreadable: assumed without VNNI" if flags is None else \
        "no VNNI (avx512_vnni/avx_vnni) or AMX"
    return {"cpu_features": features, "vnni": False, "reduce_range": True,
            "reason": f"{known}: ONNX Runtime's u8s8 kernels add pairs of u8 x s8 products in a saturating int16 "
                      "(vpmaddubsw), which 8-bit weights overflow; 7-bit weights (reduce_range) are exact there, "
                      "at the same speed"}


def host_int8_kernel() -> dict:
    """int8_kernel for this host (its /proc/cpuinfo flags)."""
    from worker.engine.cpu import host_flags

    return int8_kernel(host_flags())


def int8_kernel_note(kernel: dict) -> str:
    """The step note that records int8_kernel's choice."""
    from worker.engine.cpu import INT8_FEATURES

    features = " ".join(kernel["cpu_features"]) or "none of " + "/".join(INT8_FEATURES)
    bits = "7-bit weights (reduce_range)" if kernel["reduce_range"] else "8-bit weights"
    return f"int8 kernels (ONNX Runtime): CPU features {features}: {bits}: {kernel['reason']}"


@contextlib.contextmanager
def _tempdir(workdir: Path) -> Iterator[None]:
    """ONNX Runtime's quantizer writes temporary models: keep them in the job's work folder."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(workdir)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def weight_nodes(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, weight initializer name) of each Conv/Gemm/MatMul/Gather with a constant weight, in graph order."""
    inits = {i.name for i in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for node in proto.graph.node:
        pos = _WEIGHT_OPS.get(node.op_type)
        if pos is None or pos >= len(node.input):
            continue
        name = node.input[pos]
        producer = producers.get(name)
        if name not in inits and producer is not None and producer.op_type in ("Transpose", "Identity"):
            name = producer.input[0]
        if name in inits:
            found.append((node, name))
    return found


def layer_of(init_name: str, layers: list[str]) -> str | None:
    """The torch layer name an exported initializer stands for (exporters keep the state-dict name, sometimes
    under a wrapper's prefix such as `hf.`)."""
    for layer in layers:
        if init_name == layer or init_name.endswith("." + layer) or layer.endswith("." + init_name):
            return layer
    return None


def node_layer(node: onnx.NodeProto, init_name: str, layers: list[str]) -> str | None:
    """The layer a weight node computes: by its initializer's name, else by the module scope the dynamo exporter
    records on the node (its constant folding renames transposed weights to `val_N`)."""
    layer = layer_of(init_name, layers)
    if layer is not None:
        return layer
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # Innermost first: the last entries are the op's own name ('linear'), then its module.
            for scope in reversed(scopes if isinstance(scopes, list) else []):
                layer = layer_of(f"{scope}.weight", layers) if isinstance(scope, str) and scope else None
                if layer is not None:
                    return layer
    return None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` the graph's nodes and drop the initializers nothing reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def gemm_to_matmul(proto: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W, b) with a constant W as MatMul + Add: ONNX Runtime's dynamic quantizer only knows
    MatMul, and the exporter writes 2-D Linear layers as Gemm. Returns the number rewritten."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = _attrs(node)
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        w_name = node.input[1] + "_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        if len(node.input) > 2 and node.input[2]:
            mm_out = node.output[0] + "_matmul"
            # The MatMul keeps the Gemm's name, so exclusions computed on the exported graph still apply.
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name))
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], list(node.output), name=node.name + "_bias"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], list(node.output), name=node.name))
        count += 1
    if count:
        _replace_nodes(graph, nodes)
    return count


def known_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where symbolic) from ONNX shape inference. The rewrites below keep every tensor
    they do not remove at its shape, so one inference serves them all."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    return {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}


def flatten_channels_last(proto: onnx.ModelProto, shapes: dict[str, list[int | None]] | None = None) -> int:
    """Flatten a conv feature map in channels-last order where it feeds a Gemm/MatMul with a constant weight:
    a Transpose(0, 2, 3, 1) goes before the Flatten/Reshape and the weight's input columns are permuted to match,
    so the float model computes the same thing. ONNX Runtime runs int8 convolutions in NHWC and converts back to
    NCHW before a flatten; with the flatten already channels-last, its transpose optimizer cancels the two and the
    int8 graph has no layout transpose there (the bench CNN's int8 batch of 32, medians of 30 interleaved blocks
    of 20 runs, twice: one thread 0.220-0.225 -> 0.209-0.214 ms, two threads 0.238-0.239 -> 0.229-0.233 ms).
    Returns the number rewritten."""
    graph = proto.graph
    shapes = known_shapes(proto) if shapes is None else shapes
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph)
    nodes, count = [], 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type not in ("Flatten", "Reshape") or not node.input or not node.output:
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        users = readers.get(node.output[0], [])
        if not (src and dst and len(src) == 4 and all(src[1:]) and len(dst) == 2
                and dst[1] == src[1] * src[2] * src[3] and src[2] * src[3] > 1 and len(users) == 1):
            continue
        layer = users[0]
        attrs = _attrs(layer)
        weight = inits.get(layer.input[1]) if len(layer.input) > 1 and layer.input[0] == node.output[0] else None
        if weight is None or layer.op_type not in ("Gemm", "MatMul") or attrs.get("transA", 0) \
                or len(readers.get(weight.name, [])) != 1 or node.output[0] in {o.name for o in graph.output}:
            continue
        c, h, w = src[1:]
        wt = numpy_helper.to_array(weight)
        if layer.op_type == "Gemm" and attrs.get("transB", 0):  # (out, c*h*w)
            wt = wt.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(wt.shape)
        else:  # (c*h*w, out)
            wt = wt.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(wt.shape)
        weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(wt), weight.name))
        channels_last = node.input[0] + "_channels_last"
        nodes.insert(len(nodes) - 1, helper.make_node("Transpose", [node.input[0]], [channels_last],
                                                      name=node.name + "_channels_last", perm=[0, 2, 3, 1]))
        node.input[0] = channels_last
        count += 1
    if count:
        _replace_nodes(graph, nodes)
    return count


def spatial_mean_to_global_pool(proto: onnx.ModelProto, shapes: dict[str, list[int | None]] | None = None) -> int:
    """Rewrite ReduceMean over the two spatial axes of a 4-D tensor (what exporters write for
    AdaptiveAvgPool2d(1) and x.mean((2, 3))) as GlobalAveragePool, plus a Flatten where the mean drops those
    axes: the same values, but an op ONNX Runtime's static quantization has an int8 kernel for
    (QLinearGlobalAveragePool, in NHWC), so the last block's residual Add, its ReLU and the pooling run in int8
    instead of leaving the quantized graph there. Returns the number rewritten."""
    graph = proto.graph
    shapes = known_shapes(proto) if shapes is None else shapes
    inits = {i.name: i for i in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "ReduceMean" or len(shapes.get(node.input[0], [])) != 4:
            nodes.append(node)
            continue
        attrs = _attrs(node)
        if len(node.input) > 1 and node.input[1]:  # opset 18+: axes as an input
            axes_init = inits.get(node.input[1])
            axes = numpy_helper.to_array(axes_init).tolist() if axes_init is not None else None
        else:
            axes = attrs.get("axes")
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            nodes.append(node)
            continue
        if attrs.get("keepdims", 1):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
        else:
            pooled = node.output[0] + "_pooled"
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name))
            nodes.append(helper.make_node("Flatten", [pooled], list(node.output), name=node.name + "_flatten",
                                          axis=1))
        count += 1
    if count:
        _replace_nodes(graph, nodes)
    return count


def pad_input_channels(proto: onnx.ModelProto, nodes: list[str],
                       shapes: dict[str, list[int | None]] | None = None) -> list[str]:
    """Zero-pad to PADDED_CHANNELS the input channels of the named 2-D convs that read a graph input with fewer
    (grayscale, RGB): a Pad on the input and zero weight columns, so the float model computes the same thing.
    ONNX Runtime's int8 conv is slow on one channel (the bench ResNet's stem, 32x32, b32, two threads, ORT
    profile: 591 us per call on 1 channel, 180 us padded to 4). Returns the Pad nodes added (to leave float:
    the padded input is quantized once, after them)."""
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:  # pads as an input
        return []
    shapes = known_shapes(proto) if shapes is None else shapes
    inits = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - set(inits)
    readers = _readers(graph)
    wanted = set(nodes)
    out, pads = [], []
    for node in graph.node:
        dims = shapes.get(node.input[0]) if node.input else None
        if (node.op_type != "Conv" or node.name not in wanted or node.input[0] not in graph_inputs or not dims
                or len(dims) != 4 or not dims[1] or dims[1] >= PADDED_CHANNELS or _attrs(node).get("group", 1) != 1
                or len(node.input) < 2 or node.input[1] not in inits):
            out.append(node)
            continue
        weight = inits[node.input[1]]
        w = numpy_helper.to_array(weight)
        padded = np.zeros((w.shape[0], PADDED_CHANNELS, *w.shape[2:]), dtype=w.dtype)
        padded[:, : w.shape[1]] = w
        if len(readers.get(weight.name, [])) == 1:  # in place: the weight keeps its (layer) name
            weight.CopyFrom(numpy_helper.from_array(padded, weight.name))
        else:
            node.input[1] = weight.name + "_padded_channels"
            graph.initializer.append(numpy_helper.from_array(padded, node.input[1]))
        amounts = node.name + "_channel_pads"
        graph.initializer.append(numpy_helper.from_array(
            np.array([0, 0, 0, 0, 0, PADDED_CHANNELS - dims[1], 0, 0], dtype=np.int64), amounts))
        padded_input = f"{node.input[0]}_padded_for_{node.name}"
        pad = helper.make_node("Pad", [node.input[0], amounts], [padded_input], name=node.name + "_pad_channels")
        node.input[0] = padded_input
        out += [pad, node]
        pads.append(pad.name)
    if pads:
        _replace_nodes(graph, out)
        del graph.value_info[:]  # cached shapes may name the old weight's: shape inference rejects the mismatch
    return pads


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop per-node metadata (the exporter's stack traces and module scopes) and cached shapes: they are a
    sizeable share of a small model's file and nothing needs them to run."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


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


def exclusions(proto: onnx.ModelProto, float_layers: set[str], all_layers: list[str],
               keep_norm: bool) -> tuple[list[str], list[str], list[str]]:
    """(node names to leave float, weight initializers that will be quantized, initializers not matched to a
    layer). A node whose weight belongs to a float layer stays float; normalization ops too with `keep_norm`."""
    exclude, quantized, unmatched = [], [], []
    for node, init in weight_nodes(proto):
        layer = node_layer(node, init, all_layers)
        if layer is None:
            unmatched.append(init)
        if layer is not None and layer in float_layers:
            exclude.append(node.name)
        else:
            quantized.append(init)
    if keep_norm:
        exclude += [n.name for n in proto.graph.node if n.op_type in NORM_OPS]
    return exclude, quantized, unmatched


def layer_nodes(proto: onnx.ModelProto, wanted: list[str], all_layers: list[str]) -> dict[str, str]:
    """Node name -> layer, for the weight nodes that compute one of the `wanted` layers."""
    found = {}
    for node, init in weight_nodes(proto):
        layer = node_layer(node, init, all_layers)
        if layer in wanted:
            found[node.name] = layer
    return found


def name_nodes(proto: onnx.ModelProto) -> None:
    """ONNX Runtime excludes nodes by name: give unnamed nodes one."""
    taken = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


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
