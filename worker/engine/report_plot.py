"""report.png: what a job did, at a glance. Left: original and result as points of size vs accuracy and latency vs
accuracy (the two axes a team trades). Right: per-layer sparsity and bits per weight after the recipe.

Rendered with matplotlib's Agg backend (no display); returns the PNG bytes and the figures plotted, so a test can
check the picture shows what the report says.
"""

from __future__ import annotations

import io
from typing import Any


def render(metrics: dict[str, Any], layers: list[dict[str, Any]], title: str) -> tuple[bytes, dict[str, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from app.reports import headline

    original, compressed = metrics.get("original") or {}, metrics.get("compressed") or {}
    head = headline(metrics)  # the runtime/batch and smallest artifact the headline figures use
    quality_key = "accuracy" if original.get("accuracy") is not None and compressed.get("accuracy") is not None \
        else "agreement"
    quality = {"original": original.get("accuracy") if quality_key == "accuracy" else 1.0,
               "result": compressed.get(quality_key)}
    runtime, batch = head["runtime"], head["batch_size"]
    original_latency = (original.get("latency_ms") or {}).get(runtime, {}).get(str(batch), {}).get("median") \
        if runtime else None
    points = {
        "size": {"original": (original.get("size_bytes"), quality["original"]),
                 "result": (head["size_bytes"], quality["result"])},
        "latency": {"original": (original_latency, quality["original"]),
                    "result": (head["latency_ms"], quality["result"])},
        "layers": [(layer["name"], layer.get("sparsity_after"), layer.get("bits")) for layer in layers],
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 1, 2]})
    for ax, key, xlabel in ((axes[0], "size", "size on disk (KiB)"),
                            (axes[1], "latency", f"latency, {runtime} batch {batch} (ms)" if runtime else
                             "latency (not timed on a common runtime)")):
        for who, marker in (("original", "o"), ("result", "*")):
            x, y = points[key][who]
            if x is not None and y is not None:
                ax.scatter([x / 1024 if key == "size" else x], [100 * y], s=120, marker=marker, label=who)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{quality_key} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    names = [n for n, _, _ in points["layers"]]
    sparsity = [100 * (s or 0.0) for _, s, _ in points["layers"]]
    ax = axes[2]
    positions = range(len(names))
    ax.bar(positions, sparsity, color="tab:blue", alpha=0.7, label="sparsity after (%)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(list(positions))
    ax.set_xticklabels([_short(n) for n in names], rotation=60, ha="right", fontsize=7)
    bits = [b for _, _, b in points["layers"]]
    if any(b is not None for b in bits):
        twin = ax.twinx()
        twin.plot(list(positions), [b if b is not None else 32 for b in bits], "r.-", label="bits per weight")
        twin.set_ylabel("bits per weight")
        twin.set_ylim(0, 33)
    ax.set_title("per layer")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue(), points


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]
