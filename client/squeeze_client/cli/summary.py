"""The results of a job as `compress` and `jobs show` print them: original vs result per figure, the report's flags
and the guard's verdict, and under the table a one-line reason for each figure that would otherwise look wrong."""

from __future__ import annotations

import textwrap
from typing import Any

from rich.table import Table
from rich.text import Text

from squeeze_client.cli.common import num, signed, size
from squeeze_client.cli.llm_summary import print_llm

# What each flag means, in one line, where the report gives no reason of its own (metrics.flag_reasons, which says
# why for this job: servers before it sent flags alone).
FLAG_REASONS = {
    "no_size_reduction": "no artifact (compact safetensors included) is 1.05x smaller",
    "no_speedup": "no runtime or batch size is 1.05x faster beyond run-to-run noise",
    "calibrated_on_eval": "int8 calibrated on eval data; give --calibration",
}
LOW_SPARSITY = 0.05  # under this, a sparsity figure is rounding, not pruning
MACS_NOISE = 0.1  # a MACs ratio this close to 1 is the counting, not the compression


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _latency_rows(table: Table, orig: dict, comp: dict, ratios: dict) -> None:
    for runtime, by_batch in (ratios.get("latency") or {}).items():
        for batch, speedup in sorted(by_batch.items(), key=lambda kv: int(kv[0])):
            before = ((orig.get("latency_ms") or {}).get(runtime) or {}).get(batch) or {}
            after = ((comp.get("latency_ms") or {}).get(runtime) or {}).get(batch) or {}
            table.add_row(f"latency {runtime} b{batch}", num(before.get("median"), "{:.3f} ms"),
                          num(after.get("median"), "{:.3f} ms"), f"{speedup:.2f}x speed-up" if speedup else "-")


def _accuracy_change(drop: float | None) -> str:
    return "-" if drop is None else signed(-drop * 100, "{:+.2f} pt")


def _guard_rows(table: Table, guard: dict | None) -> None:
    if guard is None:
        return
    table.add_row("guard", "", Text("passed", "green") if guard["passed"] else Text("failed", "red"), "")
    for c in guard["checks"]:
        table.add_row(f"  {c['bound']}", f"limit {c['limit']}", num(c.get("measured")),
                      "ok" if c["passed"] else "missed")


def results_table(job) -> Table:
    """The measured figures of a job: original vs result, per runtime and batch size, flags and the guard."""
    m = job.metrics or {}
    orig, comp, ratios = m.get("original") or {}, m.get("compressed") or {}, m.get("ratios") or {}
    table = Table(title=f"job {job.id}: {job.status}" + (f" ({job.error.code})" if job.error else ""))
    for column in ("", "original", "compressed", "change"):
        table.add_column(column, justify="left" if not column else "right")
    # this row is the job's first output; the headline ratio (ratios.size) may be another's, e.g. the safetensors
    own = orig["size_bytes"] / comp["size_bytes"] if orig.get("size_bytes") and comp.get("size_bytes") else None
    table.add_row("size", size(orig.get("size_bytes")), size(comp.get("size_bytes")), _ratio(own))
    if comp.get("safetensors_size_bytes"):
        table.add_row("size (safetensors)", "", size(comp["safetensors_size_bytes"]),
                      _ratio(ratios.get("safetensors_size")))
    table.add_row("params (nonzero)", num(orig.get("nonzero_params"), "{:,}"), num(comp.get("nonzero_params"), "{:,}"),
                  _ratio(ratios.get("nonzero_params")))
    table.add_row("sparsity", num(orig.get("sparsity"), "{:.1%}"), num(comp.get("sparsity"), "{:.1%}"), "")
    table.add_row("MACs", num(orig.get("macs"), "{:,}"), num(comp.get("macs"), "{:,}"), _ratio(ratios.get("macs")))
    _latency_rows(table, orig, comp, ratios)
    table.add_row("accuracy", num(orig.get("accuracy"), "{:.2%}"), num(comp.get("accuracy"), "{:.2%}"),
                  _accuracy_change(ratios.get("accuracy_drop")))
    table.add_row("agreement", "", num(comp.get("agreement"), "{:.2%}"), "")
    if m.get("flags"):
        table.add_row("flags", "", ", ".join(m["flags"]), "")
    _guard_rows(table, m.get("guard"))
    return table


def _prunes_weights(recipe: dict[str, Any]) -> bool:
    return any(s.get("type") == "prune" and s.get("method", "magnitude") == "magnitude" and s.get("sparsity")
               for s in recipe.get("steps") or [])


def _sparsity_reason(comp: dict, recipe: dict[str, Any]) -> str | None:
    sparsity = comp.get("sparsity")
    if sparsity is None or sparsity >= LOW_SPARSITY or _prunes_weights(recipe):
        return None
    return f"sparsity {num(sparsity, '{:.1%}')}: weights that round to exactly 0; no step of this recipe prunes"


def _macs_reason(ratios: dict) -> str | None:
    r = ratios.get("macs")
    if r is None or not 1 - MACS_NOISE < r < 1 + MACS_NOISE:
        return None
    return f"MACs {r:.2f}x: quantizing or zeroing keeps the MAC count; the gap is counting"


def _accuracy_reason(ratios: dict, comp: dict) -> str | None:
    drop = ratios.get("accuracy_drop")
    if drop is None or _accuracy_change(drop) != "0.00 pt":
        return None
    agreement = comp.get("agreement")
    same = f"; {num(agreement, '{:.2%}')} of the answers agree" if agreement is not None else ""
    return f"accuracy 0.00 pt: unchanged within 0.005 pt{same}"


def reasons(job) -> list[str]:
    """One line for each flag of the report and for each figure that looks odd without it."""
    m = job.metrics or {}
    comp, ratios = m.get("compressed") or {}, m.get("ratios") or {}
    given = m.get("flag_reasons") if isinstance(m.get("flag_reasons"), dict) else {}
    lines = [f"{flag}: {why}" if (why := given.get(flag) or FLAG_REASONS.get(flag)) else f"{flag} (see report.json)"
             for flag in m.get("flags") or []]
    for reason in (_sparsity_reason(comp, job.recipe or {}), _macs_reason(ratios), _accuracy_reason(ratios, comp)):
        if reason:
            lines.append(reason)
    return lines


def _ms(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3g} ms" if value < 1000 else f"{value:.0f} ms"  # three figures, never 1.23e+03


def recommendation_lines(metrics: dict[str, Any] | None) -> list[str]:
    """One line per batch size of the report's deploy recommendation (metrics.recommendation: the fastest runtime
    and format measured, and the runner-up on another runtime or format); none from servers before it."""
    rec = (metrics or {}).get("recommendation")
    if not isinstance(rec, dict):
        return []
    lines = []
    for batch, best in sorted(rec.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if not isinstance(best, dict):
            continue
        line = f"b{batch} fastest: {best.get('runtime')}, {best.get('format')} ({best.get('model')}) " \
               f"{_ms(best.get('latency_ms'))}"
        nxt = best.get("runner_up")
        if isinstance(nxt, dict):
            line += f"; next: {nxt.get('runtime')}, {nxt.get('format')} {_ms(nxt.get('latency_ms'))}"
        lines.append(line)
    return lines


def report_notes(report: dict[str, Any] | None) -> list[str]:
    """The notes of report.json (the job's, then each step's): what the engine decided for the user, such as
    calibrating on the eval set when no calibration dataset was given."""
    if not isinstance(report, dict):
        return []
    lines = [f"note: {n}" for n in report.get("notes") or []]
    for step in report.get("steps") or []:
        lines += [f"note, steps[{step.get('index')}] {step.get('type')}: {n}" for n in step.get("notes") or []]
    return lines


def print_results(console, job, report: dict[str, Any] | None = None) -> None:
    """The table (and a language model's perplexity and speed, metrics.llm), the fastest runtime per batch size,
    then its reasons and the report's notes (each wrapped to the terminal)."""
    console.print(results_table(job))
    llm = (job.metrics or {}).get("llm")
    if isinstance(llm, dict):
        print_llm(console, llm)
    for line in recommendation_lines(job.metrics):
        console.print(textwrap.fill(line, max(40, min(console.width, 80)), initial_indent="  ",
                                    subsequent_indent="    "), highlight=False)
    width = max(40, min(console.width, 100))
    for line in reasons(job) + report_notes(report):
        console.print(textwrap.fill(line, width, initial_indent="  ", subsequent_indent="    "), highlight=False)
