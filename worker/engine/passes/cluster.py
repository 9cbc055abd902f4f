"""Weight sharing: k-means per layer, so each weight becomes one of `clusters` values (a palette).

Centroids are snapped to float16 before weights are assigned to them, so compact storage (fp16 codebook + packed
indices, worker/engine/compact) restores exactly the values the model was evaluated with. Zeros (from an earlier
prune step) stay exactly zero: zero is a pinned centroid of a layer that has any.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from app.recipes import ClusterSpec
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, get_format
from worker.engine.passes.base import Pass, StepContext, StepReport, register
from worker.engine.passes.prune import select

SEED = 0
MAX_FIT_SAMPLES = 65_536  # k-means is fitted on a sample this big at most; every weight is then assigned
MAX_ITERATIONS = 50
_FP16_MAX = float(np.finfo(np.float16).max)


def kmeans_1d(values: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted centroids of 1-D data: k-means++ init, then Lloyd iterations (assignment by sorted midpoints)."""
    x = values.astype(np.float64)
    centroids = np.empty(k)
    centroids[0] = x[rng.integers(x.size)]
    d2 = (x - centroids[0]) ** 2
    for i in range(1, k):
        total = d2.sum()
        pick = rng.integers(x.size) if total <= 0 else np.searchsorted(np.cumsum(d2), rng.random() * total)
        centroids[i] = x[min(pick, x.size - 1)]
        d2 = np.minimum(d2, (x - centroids[i]) ** 2)
    centroids = np.unique(centroids)
    for _ in range(MAX_ITERATIONS):
        labels = assign(x, centroids)
        counts = np.bincount(labels, minlength=centroids.size)
        sums = np.bincount(labels, weights=x, minlength=centroids.size)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)  # an empty cluster keeps its centre
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = np.sort(updated)
    return centroids


def assign(x: np.ndarray, sorted_centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each value (centroids sorted ascending)."""
    if sorted_centroids.size == 1:
        return np.zeros(x.shape, dtype=np.int64)
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return np.searchsorted(mids, x)


def cluster_values(w: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """(new values of the flat weight, whether zero was pinned). At most k distinct values come out."""
    distinct = np.unique(w)
    if distinct.size <= k:
        return w.copy(), False  # already a palette of at most k values: keep them as they are
    pin_zero = bool((w == 0).any())
    fit = w[w != 0] if pin_zero else w
    k_fit = k - 1 if pin_zero else k
    if fit.size > MAX_FIT_SAMPLES:
        fit = rng.choice(fit, MAX_FIT_SAMPLES, replace=False)
    centroids = kmeans_1d(fit, min(k_fit, np.unique(fit).size), rng)
    if pin_zero:
        centroids = np.append(centroids, 0.0)
    if np.abs(centroids).max() <= _FP16_MAX:  # snap to fp16 so compact storage's fp16 codebook is exact
        centroids = centroids.astype(np.float16).astype(np.float64)
    centroids = np.unique(centroids.astype(w.dtype)).astype(np.float64)
    out = centroids[assign(w.astype(np.float64), centroids)].astype(w.dtype)
    if pin_zero:
        out[w == 0] = 0
    return out, pin_zero


@register(ClusterSpec)
class KMeansCluster(Pass):
    def apply(self, model: LoadedModel, spec: ClusterSpec, ctx: StepContext) -> StepReport:
        fmt = get_format(model.format)
        eligible = fmt.eligible_weights(model)
        refs = select(eligible, spec.targets, spec.ignore)
        if not refs:
            raise EngineError("no_effect", f"steps[{ctx.index}]: no eligible weight matched targets={spec.targets} "
                                           f"ignore={spec.ignore}; eligible: {[r.name for r in eligible][:50]}")
        rng = np.random.default_rng(SEED)
        layers, changed_layers, total = [], 0, 0
        for i, ref in enumerate(refs):
            w = ref.read().clone()  # torch formats read a view of the live weight, which the write overwrites
            flat = w.detach().cpu().float().reshape(-1).numpy()
            new, pinned = cluster_values(flat, spec.clusters, rng)
            ref.write(torch.from_numpy(new.reshape(w.shape)).to(w.dtype))
            stored = ref.read()  # read back: proves the format stored the change
            used = int(torch.unique(stored).numel())
            if used > spec.clusters:
                raise RuntimeError(f"{ref.name}: {used} distinct values after clustering to {spec.clusters}")
            change = float((stored.float() - w.float()).abs().max()) if w.numel() else 0.0
            changed_layers += change > 0
            total += w.numel()
            layers.append({"name": ref.name, "shape": list(ref.shape),
                           "sparsity_before": round(float((w == 0).float().mean()), 6),
                           "sparsity_after": round(float((stored == 0).float().mean()), 6),
                           "clusters": used, "bits": max(1, math.ceil(math.log2(used))) if used > 1 else 1,
                           "zero_pinned": pinned, "max_abs_change": change})
            ctx.progress((i + 1) / len(refs), f"clustered {ref.name}")
        if changed_layers == 0:
            raise EngineError("no_effect", f"steps[{ctx.index}]: every matched weight already has at most "
                                           f"{spec.clusters} distinct values; clustering changed nothing")
        return {"type": "cluster", "clusters": spec.clusters, "layers": layers, "layers_changed": changed_layers,
                "eligible_params": total, "skipped": sorted({r.name for r in eligible} - {r.name for r in refs})}
