"""Quantization that changes an eager model in place: torch dynamic int8, torchao weight-only int8/int4, binary."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from worker.engine.formats.base import WeightRef

_FP16_MAX = float(np.finfo(np.float16).max)


def module_of(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def dynamic_int8(net: torch.nn.Module, modules: list[str], per_channel: bool) -> list[str]:
    """torch's eager dynamic int8 of the named Linear modules; returns the ones replaced."""
    from worker.engine.formats import _quantized

    linear = [m for m in modules if isinstance(net.get_submodule(m), torch.nn.Linear)]
    _quantized.quantize_dynamic_modules(net, linear, per_channel)
    return [m for m in linear if _is_dynamic(net.get_submodule(m))]


def _is_dynamic(mod: torch.nn.Module) -> bool:
    from worker.engine.formats._torch import is_dynamic_quantized

    return is_dynamic_quantized(mod)


def weight_only(net: torch.nn.Module, modules: list[str], bits: int, group_size: int | None) -> list[str]:
    """torchao weight-only quantization of the named Linear modules; returns the ones whose weight became a
    quantized tensor. int8: per output channel (or per group); int4: per group of `group_size` inputs, as
    IntxWeightOnlyConfig (torchao's packed int4 CPU kernels need a library not installed here)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

    wanted = {m for m in modules if isinstance(net.get_submodule(m), torch.nn.Linear)}
    if bits == 8:
        config = Int8WeightOnlyConfig(granularity=PerGroup(group_size)) if group_size else Int8WeightOnlyConfig()
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size or 128))
    if group_size or bits == 4:
        size = group_size or 128
        wanted = {m for m in wanted if net.get_submodule(m).in_features % size == 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(net, config, filter_fn=lambda mod, fqn: fqn in wanted)
    return sorted(m for m in wanted if type(net.get_submodule(m).weight) is not torch.nn.Parameter)


def binarize(ref: WeightRef) -> tuple[torch.Tensor, torch.Tensor]:
    """Write sign(w) * s_c into the weight, s_c = mean |w| over output channel c (the L2-optimal scale for sign
    weights), snapped to float16 so compact storage keeps it exactly. Returns (old, new) weights."""
    w = ref.read().clone()
    rows = w.detach().float().reshape(w.shape[0], -1)
    scale = rows.abs().mean(dim=1).clamp(max=_FP16_MAX).half().float()
    signs = torch.where(rows >= 0, 1.0, -1.0)
    new = (signs * scale[:, None]).reshape(w.shape).to(w.dtype)
    new[(scale == 0)[:, None].expand_as(rows).reshape(w.shape)] = 0.0  # +0.0: an all-zero row stays all +0
    ref.write(new)
    return w, ref.read()
