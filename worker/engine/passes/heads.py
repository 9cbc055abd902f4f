"""Attention-head removal for the channel-prune step (`heads: fraction`): whole heads leave a self-attention
block, so the query/key/value projections lose `head_size` output rows per head and the output projection
the matching input columns. The block's forward infers the head count from the projection width (the format's
`attention_heads` hook only returns blocks for which that holds), so the pruned model runs as it is.

Importance per head is the norm of all its weights (q/k/v rows and output columns; `l1`/`l2`), or for
`taylor` the first-order estimate sum |w * dL/dw| over the same weights (gradients accumulated beforehand).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _head_parts(block: Any, h: int, grads: bool = False) -> list[torch.Tensor]:
    """Head h's weights (views): its q/k/v rows and output-projection columns; or their gradients (zeros where
    none was accumulated)."""
    def of(p: nn.Parameter) -> torch.Tensor:
        return (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p

    rows = slice(h * block.head_size, (h + 1) * block.head_size)
    return [of(block.query.weight)[rows], of(block.key.weight)[rows], of(block.value.weight)[rows],
            of(block.output.weight)[:, rows]]


def head_importance(block: Any, importance: str) -> torch.Tensor:
    n_heads = block.query.out_features // block.head_size
    scores = []
    with torch.no_grad():
        for h in range(n_heads):
            parts = _head_parts(block, h)
            if importance == "taylor":
                scores.append(sum(float((w * g).abs().sum()) for w, g in zip(parts, _head_parts(block, h, True))))
            else:
                p = 1 if importance == "l1" else 2
                scores.append(float(torch.cat([w.reshape(-1) for w in parts]).norm(p=p)))
    return torch.tensor(scores)


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[index].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone())
    linear.out_features = int(index.numel())


def _keep_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone())
    linear.in_features = int(index.numel())


def remove_heads(block: Any, fraction: float, importance: str) -> dict[str, Any]:
    """Remove the floor(fraction * heads) least important heads (at least one stays); report what went."""
    n_heads = block.query.out_features // block.head_size
    n_remove = min(int(n_heads * fraction), n_heads - 1)
    scores = head_importance(block, importance)
    if n_remove <= 0:
        return {"name": block.name, "heads_before": n_heads, "heads_after": n_heads, "removed": []}
    removed = sorted(int(i) for i in torch.argsort(scores)[:n_remove])
    kept = [h for h in range(n_heads) if h not in removed]
    d = block.head_size
    index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept])
    for proj in (block.query, block.key, block.value):
        _keep_rows(proj, index)
    _keep_columns(block.output, index)
    # Attributes the block's forward or its attention interface may read.
    if hasattr(block.module, "num_attention_heads"):
        block.module.num_attention_heads = len(kept)
    if hasattr(block.module, "all_head_size"):
        block.module.all_head_size = len(kept) * d
    return {"name": block.name, "heads_before": n_heads, "heads_after": len(kept), "removed": removed,
            "importance": [round(float(s), 6) for s in scores]}
