"""Storage of eagerly quantized modules in a model package: int8/int4 weights in weights.safetensors plus a
`quantization.json` manifest that tells the loader how to rebuild the quantized modules around them.

    {"format": "squeeze-quantized", "version": 1, "method": "dynamic_int8" | "weight_int8" | "weight_int4",
     "modules": [module names], "per_channel": bool,
     "torchao": {safetensors metadata of torchao's flattened tensors} (weight_int8/int4),
     "int4_packed": {tensor name: shape} (two int4 values per byte, low nibble first)}

dynamic_int8 (torch's eager dynamic quantization): NAME.weight (int8), NAME.weight_scale, NAME.weight_zero_point,
NAME.bias for each quantized Linear. weight_int8/int4 (torchao): torchao's own flattened tensors
(NAME._weight_qdata, NAME._weight_scale, ...), rebuilt by torchao.prototype.safetensors from an allowlist of
tensor classes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

MANIFEST = "quantization.json"
FORMAT = "squeeze-quantized"


def _dynamic_modules(net: torch.nn.Module) -> dict[str, Any]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: mod for name, mod in net.named_modules() if isinstance(mod, DynamicLinear)}


def quantize_dynamic_modules(net: torch.nn.Module, names: list[str], per_channel: bool) -> None:
    """torch's eager dynamic int8 quantization of the named Linear modules, in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        quantize_dynamic(net, {name: qconfig for name in names}, dtype=torch.qint8, inplace=True)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (low nibble first); an odd count is padded with 0."""
    flat = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    lo, hi = packed & 0xF, packed >> 4
    flat = torch.stack([lo, hi], dim=1).reshape(-1)[:n].to(torch.int16)
    return torch.where(flat >= 8, flat - 16, flat).to(torch.int8).reshape(shape)


def saved_state(net: torch.nn.Module, info: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for weights.safetensors, manifest) of a module quantized as `info` says."""
    method = info["method"]
    manifest = {"format": FORMAT, "version": 1, "method": method, "modules": list(info["modules"]),
                "per_channel": bool(info.get("per_channel", True))}
    if method == "dynamic_int8":
        quantized = _dynamic_modules(net)
        prefixes = tuple(f"{name}." for name in quantized)
        tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()
                   if isinstance(v, torch.Tensor) and not k.startswith(prefixes)}
        for name, mod in quantized.items():
            w, b = mod._weight_bias()
            tensors[f"{name}.weight"] = w.int_repr().contiguous()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float().contiguous()
                tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().int().contiguous()
            else:
                tensors[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
                tensors[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int32)
            if b is not None:
                tensors[f"{name}.bias"] = b.detach().float().contiguous()
        manifest["modules"] = sorted(quantized)
        return tensors, manifest
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(net.state_dict())
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    manifest["torchao"] = metadata
    if method == "weight_int4":
        packed = {}
        for name in info["modules"]:
            key = f"{name}._weight_qdata"
            if key in tensors:
                packed[key] = list(tensors[key].shape)
                tensors[key] = pack_int4(tensors[key])
        manifest["int4_packed"] = packed
    return tensors, manifest


def restore_state(net: torch.nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Rebuild the quantized modules of a freshly built `net` and load the stored tensors into them."""
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{MANIFEST} is not a {FORMAT} version 1 manifest")
    method = manifest["method"]
    if method == "dynamic_int8":
        names = list(manifest["modules"])
        prefixes = tuple(f"{n}." for n in names)
        plain = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
        result = net.load_state_dict(plain, strict=False)  # the float layers, before the others are replaced
        missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
        if missing or result.unexpected_keys:
            raise ValueError(f"stored weights do not match: missing {missing[:10]}, unexpected "
                             f"{list(result.unexpected_keys)[:10]}")
        quantize_dynamic_modules(net, names, bool(manifest.get("per_channel", True)))
        quantized = _dynamic_modules(net)
        if sorted(quantized) != sorted(names):
            raise ValueError(f"dynamic quantization rebuilt {sorted(quantized)}, the manifest lists {sorted(names)}")
        for name, mod in quantized.items():
            q, scale, zp = (tensors[f"{name}.weight{s}"] for s in ("", "_scale", "_zero_point"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if manifest.get("per_channel", True):
                    w = torch._make_per_channel_quantized_tensor(q, scale.double(), zp.long(), 0)
                else:
                    w = torch._make_per_tensor_quantized_tensor(q, float(scale[0]), int(zp[0]))
            mod.set_weight_bias(w, tensors.get(f"{name}.bias"))
        return
    if method not in ("weight_int8", "weight_int4"):
        raise ValueError(f"unknown quantization method {method!r}")
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    tensors = dict(tensors)
    for key, shape in (manifest.get("int4_packed") or {}).items():
        tensors[key] = unpack_int4(tensors[key], shape)
    state = unflatten_tensor_state_dict(tensors, manifest["torchao"])
    state = state[0] if isinstance(state, tuple) else state
    net.load_state_dict(state, strict=True, assign=True)
