"""The LLM block of a job's results (metrics["llm"], a Hugging Face causal LM judged by perplexity): what the
perplexity was measured on, then per model (the original, each output) its perplexity and relative change, decode
and prefill speed and file size, then the runtime each ran on, the worst increase and the notes.

Every key may be missing or None (a server before it, a measurement that failed): that figure is written "-"."""

from __future__ import annotations

import textwrap
from typing import Any

from rich.table import Table

from squeeze_client.cli.common import num, signed, size


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> str:
    return num(value, "{:,}") if isinstance(value, int) and not isinstance(value, bool) else "-"


def eval_line(llm: dict[str, Any]) -> str:
    """What the perplexity is measured on: "perplexity on 2,048 tokens of 'eval', 8 windows of 256"."""
    ev = _dict(llm.get("eval"))
    dataset = f"'{ev['dataset']}'" if ev.get("dataset") else "-"
    line = (f"perplexity on {_count(ev.get('tokens'))} tokens of {dataset}, {_count(ev.get('windows'))} windows of "
            f"{_count(ev.get('seq_len'))}")
    stride = ev.get("stride")
    if stride is not None and stride != ev.get("seq_len"):
        line += f", stride {_count(stride)}"
    return line


def perplexity_change(perplexity: Any, original: Any) -> str:
    """The relative change of a perplexity against the original's, in percent ("+5.5%"); "-" when either is
    missing."""
    if not isinstance(perplexity, (int, float)) or not isinstance(original, (int, float)) or original <= 0:
        return "-"
    return signed((perplexity / original - 1) * 100, "{:+.1f}%")


def _models(llm: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    outputs = _dict(llm.get("outputs"))
    return [("original", _dict(llm.get("original")))] + [(str(name), _dict(m)) for name, m in outputs.items()]


def llm_table(llm: dict[str, Any]) -> Table:
    """One row per model: perplexity, its change against the original, decode and prefill tokens/s, file size."""
    table = Table(title="LLM: " + eval_line(llm))
    for column in ("", "perplexity", "change", "decode tok/s", "prefill tok/s", "size"):
        table.add_column(column, justify="left" if not column else "right")
    original = _dict(llm.get("original")).get("perplexity")
    for name, m in _models(llm):
        change = "" if name == "original" else perplexity_change(m.get("perplexity"), original)
        table.add_row(name, num(m.get("perplexity"), "{:.2f}"), change, num(m.get("decode_tokens_per_s"), "{:,.1f}"),
                      num(m.get("prefill_tokens_per_s"), "{:,.1f}"), size(m.get("size_bytes")))
    return table


def llm_lines(llm: dict[str, Any]) -> list[str]:
    """Under the table: the runtime each model ran on, the worst perplexity increase, the notes."""
    lines = []
    for name, m in _models(llm):
        rss = m.get("peak_rss_mb")
        memory = f", peak RSS {num(rss, '{:,.0f}')} MB" if isinstance(rss, (int, float)) else ""
        if m.get("runtime") or memory:
            lines.append(f"{name}: run on {m.get('runtime') or '-'}{memory}")
    worst = llm.get("perplexity_increase")
    if isinstance(worst, (int, float)):
        lines.append(f"perplexity increase (the worst output's): {signed(worst * 100, '{:+.1f}%')}")
    lines += [f"note: {n}" for n in llm.get("notes") or [] if n]
    return lines


def print_llm(console, llm: dict[str, Any]) -> None:
    """The LLM table, then its lines wrapped to the terminal (at most 100 columns)."""
    console.print(llm_table(llm))
    width = max(40, min(console.width, 100))
    for line in llm_lines(llm):
        console.print(textwrap.fill(line, width, initial_indent="  ", subsequent_indent="    "), highlight=False)
