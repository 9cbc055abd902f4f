"""Pareto charts as PNG. matplotlib (Agg) is imported inside the function, so the API starts without it."""

from __future__ import annotations

import io
import json
from typing import Any

PANELS = (("size", "size_bytes"), ("latency", "latency_ms"))
QUALITY_LABEL = {"accuracy_after": "accuracy (%)", "agreement": "top-1 agreement with the original (%)"}
POINTS_KEY = "squeeze:points"  # PNG text chunk listing what was drawn


def _size_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1


def _latency_label(points: list[dict[str, Any]]) -> str:
    where = {(p.get("runtime"), p.get("batch_size")) for p in points if p.get("latency_ms") is not None}
    if len(where) == 1:
        runtime, batch = where.pop()
        return f"latency (ms, median, batch {batch}, {runtime})"
    return "latency (ms, median; runtime and batch vary by job)"


def pareto_png(points: list[dict[str, Any]], fronts: dict[str, Any], *, title: str,
               pick: str | None = None) -> tuple[bytes, list[dict[str, Any]]]:
    """Two panels, size vs quality and latency vs quality (quality = fronts["quality"]: accuracy, else agreement).

    `points`: {id, label, size_bytes, latency_ms, accuracy_after, agreement, failed_guard, runtime, batch_size}.
    Every point that has both figures of a panel is drawn (guard misses as red crosses); the front (`fronts[panel]`,
    ids in cost order) is connected and highlighted; `pick` (an id) is starred. Returns the PNG and the drawn
    points [{panel, id, x, y, front, pick}] (x, y in the input's units), which the PNG also carries in its text
    chunk `squeeze:points`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    quality = fronts.get("quality")
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    fig.suptitle(title)
    drawn: list[dict[str, Any]] = []
    for ax, (panel, cost) in zip(axes, PANELS):
        ax.grid(True, alpha=0.3)
        usable = [p for p in points if quality and p.get(cost) is not None and p.get(quality) is not None]
        if panel == "size":
            unit, scale = _size_unit(max((p[cost] for p in usable), default=0))
            ax.set_xlabel(f"size of the smallest artifact ({unit})")
        else:
            scale = 1
            ax.set_xlabel(_latency_label(points))
        ax.set_ylabel(QUALITY_LABEL.get(quality, "quality"))
        ax.set_title(f"{panel} vs {'accuracy' if quality == 'accuracy_after' else 'agreement'}")
        if not usable:
            ax.text(0.5, 0.5, "no job measured both figures", ha="center", va="center", transform=ax.transAxes)
            continue
        front_ids = list(fronts.get(panel) or [])
        by_id = {p["id"]: p for p in usable}
        xy = {p["id"]: (p[cost] / scale, 100 * p[quality]) for p in usable}
        ok = [p for p in usable if not p.get("failed_guard")]
        missed = [p for p in usable if p.get("failed_guard")]
        if ok:
            ax.scatter([xy[p["id"]][0] for p in ok], [xy[p["id"]][1] for p in ok], s=36, color="0.55",
                       label="job", zorder=2)
        if missed:
            ax.scatter([xy[p["id"]][0] for p in missed], [xy[p["id"]][1] for p in missed], s=48, marker="x",
                       color="tab:red", label="missed its guard", zorder=3)
        on_front = [i for i in front_ids if i in by_id]
        if on_front:
            ax.plot([xy[i][0] for i in on_front], [xy[i][1] for i in on_front], "-o", color="tab:blue", lw=2,
                    ms=9, mfc="none", mew=2, label="Pareto front", zorder=4)
        if pick in by_id:
            ax.scatter([xy[pick][0]], [xy[pick][1]], s=260, marker="*", color="gold", edgecolors="black",
                       label="pick", zorder=5)
        for p in usable:
            ax.annotate(str(p.get("label") or p["id"]), xy[p["id"]], textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
            drawn.append({"panel": panel, "id": p["id"], "x": p[cost], "y": p[quality],
                          "front": p["id"] in on_front, "pick": p["id"] == pick})
        ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={POINTS_KEY: json.dumps(drawn)})
    return buf.getvalue(), drawn
