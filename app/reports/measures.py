"""Reading a job's measured metrics: the headline figures, the guard's verdict, Pareto fronts and sweep objectives.

Pure functions on the metrics dict the sandbox reports (original / compressed / ratios / flags), shared by the
worker (which checks the guard before the job ends) and the API (comparison across jobs, sweeps). No torch.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from app.recipes import GuardSpec, Objective


def _largest_batch(by_batch: dict[str, Any]) -> str | None:
    return max(by_batch, key=int) if by_batch else None


def speed_point(metrics: dict[str, Any], runtime: str | None = None,
                batch: int | None = None) -> tuple[str, str] | None:
    """The (runtime, batch) a headline speed-up is read at: the given ones, else the first runtime measured on
    both sides and its largest batch size."""
    latency = (metrics.get("ratios") or {}).get("latency") or {}
    rts = [runtime] if runtime else list(latency)
    for rt in rts:
        by_batch = latency.get(rt) or {}
        b = str(batch) if batch is not None else _largest_batch(by_batch)
        if b is not None and by_batch.get(b) is not None:
            return rt, b
    return None


def headline(metrics: dict[str, Any] | None, runtime: str | None = None, batch: int | None = None) -> dict[str, Any]:
    """The figures a team compares jobs by; None where the job did not measure them."""
    metrics = metrics or {}
    original, compressed = metrics.get("original") or {}, metrics.get("compressed") or {}
    ratios = metrics.get("ratios") or {}
    sizes = [r for r in (ratios.get("size"), ratios.get("safetensors_size")) if r is not None]
    point = speed_point(metrics, runtime, batch)
    latency = None
    if point is not None:
        latency = ((compressed.get("latency_ms") or {}).get(point[0]) or {}).get(point[1], {}).get("median")
    # Every output's size where the report has them (output_sizes), else the measured one and the compact one.
    smallest = [s for s in (compressed.get("size_bytes"), compressed.get("safetensors_size_bytes"),
                            *(compressed.get("output_sizes") or {}).values()) if s]
    return {
        "size_ratio": max(sizes) if sizes else None,
        "size_bytes": min(smallest) if smallest else None,
        "original_size_bytes": original.get("size_bytes"),
        "macs_ratio": ratios.get("macs"),
        "speedup": ratios["latency"][point[0]][point[1]] if point else None,
        "runtime": point[0] if point else None,
        "batch_size": int(point[1]) if point else None,
        "latency_ms": latency,
        "accuracy_before": original.get("accuracy"),
        "accuracy_after": compressed.get("accuracy"),
        "accuracy_drop": ratios.get("accuracy_drop"),
        "agreement": compressed.get("agreement"),
        "flags": metrics.get("flags") or [],
    }


def check_guard(guard: GuardSpec | None, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Each bound against the measured figure: {passed, checks: [{bound, limit, measured, passed, missed_by}]}.

    A bound whose figure was not measured fails (a guard that cannot be checked must not pass silently): e.g.
    max_accuracy_drop without a labelled eval dataset.
    """
    if guard is None:
        return None
    head = headline(metrics, guard.runtime, guard.batch_size)
    checks = []

    def add(bound: str, limit: float | None, measured: float | None, higher_is_better: bool, what: str) -> None:
        if limit is None:
            return
        if measured is None:
            checks.append({"bound": bound, "limit": limit, "measured": None, "passed": False,
                           "missed_by": None, "reason": f"{what} was not measured"})
            return
        ok = measured >= limit if higher_is_better else measured <= limit
        checks.append({"bound": bound, "limit": limit, "measured": measured, "passed": ok,
                       "missed_by": None if ok else round(abs(measured - limit), 6)})

    add("max_accuracy_drop", guard.max_accuracy_drop, head["accuracy_drop"], False,
        "accuracy (needs an eval dataset with labels)")
    add("min_agreement", guard.min_agreement, head["agreement"], True, "agreement with the original")
    where = f" on {head['runtime']} at batch {head['batch_size']}" if head["runtime"] else ""
    add("min_speedup", guard.min_speedup, head["speedup"], True,
        f"a speed-up{where or ' (no runtime timed both original and result)'}")
    add("min_size_ratio", guard.min_size_ratio, head["size_ratio"], True, "the size ratio")
    add("max_perplexity_increase", guard.max_perplexity_increase,
        ((metrics or {}).get("llm") or {}).get("perplexity_increase"), False,
        "perplexity (needs a causal LM and an eval text)")
    for c in checks:
        if c["bound"] == "min_speedup" and head["runtime"]:
            c["runtime"], c["batch_size"] = head["runtime"], head["batch_size"]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def guard_message(verdict: dict[str, Any]) -> str:
    failed = [c for c in verdict["checks"] if not c["passed"]]
    parts = []
    for c in failed:
        if c["measured"] is None:
            parts.append(f"{c['bound']} {c['limit']}: {c['reason']}")
        else:
            parts.append(f"{c['bound']} {c['limit']}: measured {c['measured']} (missed by {c['missed_by']})")
    return "the result misses its guard: " + "; ".join(parts)


def pareto_front(rows: Iterable[dict[str, Any]], cost: str, quality: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both: lower `cost` (e.g. size_bytes, latency_ms) and higher `quality`
    (accuracy_after or agreement). Rows missing either figure are left out. Sorted by cost."""
    points = [r for r in rows if r.get(cost) is not None and r.get(quality) is not None]
    front = []
    for r in points:
        dominated = any(o is not r and o[cost] <= r[cost] and o[quality] >= r[quality]
                        and (o[cost] < r[cost] or o[quality] > r[quality]) for o in points)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r[cost], -r[quality]))


def objective_score(objective: Objective, head: dict[str, Any]) -> float | None:
    """Higher is better. smallest: the size ratio; fastest: the speed-up; weighted: size * ln(size ratio) +
    speed * ln(speed-up) - accuracy * (accuracy drop in points). None when a needed figure is missing."""
    if objective == "smallest":
        return head["size_ratio"]
    if objective == "fastest":
        return head["speedup"]
    weights = objective if isinstance(objective, dict) else objective.model_dump()
    score = 0.0
    for key, figure, transform in (("size", "size_ratio", math.log), ("speed", "speedup", math.log),
                                   ("accuracy", "accuracy_drop", lambda d: -100.0 * d)):
        w = weights.get(key) or 0.0
        if w:
            value = head.get(figure)
            if value is None or (transform is math.log and value <= 0):
                return None
            score += w * transform(value)
    return round(score, 6)
