"""Per-layer sensitivity of a causal LM to weight quantization, and the mixed-precision plan it gives.

Each decoder layer alone has its linear weights rounded to nearest at the step's bits and group size (a plain
torch fake quantization: the cheapest proxy), the perplexity on calibration windows is measured, and the weights
are put back. `mixed_plan` keeps the layers whose rounding hurt most at 8 bits while the average bits per quantized
weight stays within the budget (docs/llm.md)."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

from worker.engine.llm.evaluate import perplexity

_LAYER = re.compile(r"^(.*?layers\.\d+)\.")


def decoder_layer(module_name: str) -> str | None:
    """`model.layers.3` for `model.layers.3.mlp.up_proj`; None outside the decoder layers."""
    match = _LAYER.match(module_name)
    return match.group(1) if match else None


def fake_quantize(weight: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest: one scale per output row (group None) or per `group` input columns."""
    out_features, in_features = weight.shape
    g = group or in_features
    w = weight.detach().float().reshape(out_features, in_features // g, g)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    q = (w / scale).round().clamp(-qmax - 1, qmax) * scale
    return q.reshape(out_features, in_features).to(weight.dtype)


@torch.inference_mode()
def layer_sensitivity(model: torch.nn.Module, modules: list[str], windows: np.ndarray, bits: int,
                      group: int | None, progress: Callable[[float, str], None] = lambda f, m: None) -> dict:
    """{"baseline": perplexity, "layers": [{layer, modules, params, perplexity, increase}]} on `windows`
    (token ids, samples x seq_len), most sensitive first."""
    stream, seq_len = windows.reshape(-1), int(windows.shape[1])
    baseline = perplexity(model, stream, seq_len, None, len(stream)).perplexity
    by_layer: dict[str, list[str]] = {}
    for name in modules:
        layer = decoder_layer(name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(name)
    rows = []
    for i, (layer, names) in enumerate(by_layer.items()):
        linears = [model.get_submodule(n) for n in names]
        saved = [m.weight.detach().clone() for m in linears]
        for m in linears:
            m.weight.copy_(fake_quantize(m.weight, bits, group))
        ppl = perplexity(model, stream, seq_len, None, len(stream)).perplexity
        for m, w in zip(linears, saved):
            m.weight.copy_(w)
        rows.append({"layer": layer, "modules": names, "params": sum(m.weight.numel() for m in linears),
                     "perplexity": round(ppl, 4), "increase": round(ppl / baseline - 1, 6)})
        progress((i + 1) / len(by_layer), f"sensitivity: {layer} {ppl / baseline - 1:+.2%}")
    rows.sort(key=lambda r: r["increase"], reverse=True)
    return {"baseline": round(baseline, 4), "bits": bits, "group_size": group, "tokens": int(stream.size),
            "layers": rows}


def mixed_plan(sensitivity: dict, low_bits: int, budget: float, other_params: int = 0) -> tuple[list[str], float]:
    """(the decoder layers kept at 8 bits, the resulting average bits per quantized weight): the most sensitive
    first, each added only while the average stays within `budget`. `other_params`: quantized weights outside the
    decoder layers (at `low_bits`)."""
    rows = sensitivity["layers"]
    total = sum(r["params"] for r in rows) + other_params
    bits_sum = low_bits * total
    kept = []
    for row in rows:
        if row["increase"] <= 0:
            break
        more = bits_sum + (8 - low_bits) * row["params"]
        if more / total > budget:
            continue
        bits_sum = more
        kept.append(row["layer"])
    return kept, round(bits_sum / total, 4)
