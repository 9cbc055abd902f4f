"""PT2E static int8 for .pt2 output: torchao's prepare_pt2e / convert_pt2e with the X86 inductor quantizer.

The converted graph computes with dequantize(int8 weight) patterns that inductor (torch.compile with freezing)
lowers to int8 kernels; run eagerly it is slower than fp32 (bench/RESULTS.md). convert_pt2e leaves the fp32 weights
registered though unused, so they are deleted before the program is exported again: otherwise the .pt2 is
larger than the fp32 one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from worker.engine.errors import EngineError
from worker.engine.shared.data import calibration_chunks, fixed_batch_hint

_CALIBRATION_BATCH = 32


def _config(calibration: str, per_channel: bool):
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import get_default_x86_inductor_quantization_config

    config = get_default_x86_inductor_quantization_config()
    act = config.input_activation
    # minmax: the observed range; percentile/entropy: the histogram observer's error-minimising range search.
    observer = MinMaxObserver if calibration == "minmax" else HistogramObserver
    act = dataclasses.replace(act, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
    weight = config.weight
    if not per_channel:
        weight = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
                                  is_dynamic=False, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    elif weight.observer_or_fake_quant_ctr is None:
        weight = dataclasses.replace(weight, observer_or_fake_quant_ctr=PerChannelMinMaxObserver)
    return dataclasses.replace(config, input_activation=act, output_activation=act, weight=weight)


def strip_unused(gm: torch.fx.GraphModule) -> list[str]:
    """Delete parameters and buffers no graph node reads (the fp32 weights convert_pt2e replaced)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = []
    for name in [k for k, _ in [*gm.named_parameters(), *gm.named_buffers()]]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
            removed.append(name)
    return removed


def split_shared_modules(gm: torch.fx.GraphModule) -> int:
    """Give each call of a shared stateless module (one nn.ReLU used twice, as residual blocks often do) its own
    source partition. An export without source_fn_stack metadata is partitioned by the innermost module, so both
    calls land in one partition with two outputs, which the quantizer's pattern matcher refuses."""
    by_module: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack and node.meta.get("source_fn_stack") is None:
            fqn, cls = list(stack.values())[-1]
            if _class_of(cls) in _STATELESS:
                by_module.setdefault(fqn, []).append(node)
    split = 0
    for fqn, nodes in by_module.items():
        if len(nodes) > 1:
            cls = _class_of(list(nodes[0].meta["nn_module_stack"].values())[-1][1])
            for node in nodes:
                node.meta["source_fn_stack"] = [(f"{fqn}__{node.name}", cls)]
            split += 1
    return split


def _class_of(cls) -> type | None:
    if isinstance(cls, type):
        return cls
    return next((c for c in _STATELESS if isinstance(cls, str) and cls == f"{c.__module__}.{c.__qualname__}"), None)


_STATELESS = {torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh, torch.nn.SiLU, torch.nn.GELU, torch.nn.Sigmoid,
              torch.nn.Hardswish, torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d, torch.nn.Identity}


def quantize(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...], dynamic_batch: bool,
             calibration_arrays: list[np.ndarray], *, calibration: str, per_channel: bool,
             float_modules: list[str]) -> tuple[torch.export.ExportedProgram, dict]:
    """Calibrate and convert `gm` (a torch.export graph module), re-export it; returns the program and facts."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    quantizer = X86InductorQuantizer().set_global(_config(calibration, per_channel))
    for name in float_modules:
        quantizer.set_module_name_qconfig(name, None)
    split_shared_modules(gm)
    try:
        prepared = prepare_pt2e(gm, quantizer)
        # A graph captured with a fixed batch takes only that batch: calibrate batch by batch at it.
        step = _CALIBRATION_BATCH if dynamic_batch else int(args[0].shape[0])
        with torch.no_grad():
            for chunk in calibration_chunks(calibration_arrays, step, fixed=not dynamic_batch):
                prepared(*[torch.from_numpy(a) for a in chunk])
        converted = convert_pt2e(prepared)
    except Exception as exc:
        raise EngineError("unsupported", fixed_batch_hint(f"PT2E quantization failed: {type(exc).__name__}: "
                                                          f"{str(exc)[:500]}")) from exc
    removed = strip_unused(converted)
    int8 = {k: tuple(v.shape) for k, v in converted.state_dict().items() if v.dtype == torch.int8 and v.ndim >= 2}
    dynamic = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
    try:
        ep = torch.export.export(converted, args, dynamic_shapes=dynamic)
    except Exception:
        ep = torch.export.export(converted, args)
    return ep, {"int8_weights": int8, "removed_fp32": removed}
