"""An exported ONNX graph's weight nodes and the model layers they compute: which nodes quantization leaves float
(by name: ONNX Runtime excludes nodes by name, so every node gets one)."""

from __future__ import annotations

import onnx

NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
            "SimplifiedLayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"}
_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}


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
