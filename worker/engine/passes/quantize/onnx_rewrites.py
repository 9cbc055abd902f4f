"""Rewrites of an ONNX graph that keep what the float model computes and help ONNX Runtime's quantization: Gemm as
MatMul (dynamic int8), channels-last flattens, spatial means as GlobalAveragePool and padded input channels (static
int8); and the debug metadata dropped from the result."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

PADDED_CHANNELS = 4  # see pad_input_channels


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
