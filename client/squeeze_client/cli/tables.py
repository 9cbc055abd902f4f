"""The list tables: 80 columns by default (full ids, since they are what the other commands take; a name too long
is cut with an ellipsis rather than wrapped), every column with --wide."""

from __future__ import annotations

from rich import box
from rich.table import Table

from squeeze_client.cli.common import size


FREE_TEXT = ("name", "description", "error")  # the columns that give way when the others need the room


def _table(*columns: str, wide: bool) -> Table:
    """Columns of ids, times and codes never shrink; free text is cut with an ellipsis (folded with --wide)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        free = column in FREE_TEXT
        table.add_column(column, no_wrap=not free, overflow="fold" if wide else "ellipsis",
                         min_width=8 if free else None)
    return table


def file_table(rows, wide: bool = False) -> Table:
    """Models or datasets: id, name, format, size, created (--wide: the sha256 and the full time too)."""
    columns = ("id", "name", "format", "size", "created") + (("sha256",) if wide else ())
    table = _table(*columns, wide=wide)
    for r in rows:
        created = f"{r.created_at:%Y-%m-%d %H:%M:%S}" if wide else f"{r.created_at:%m-%d %H:%M}"
        table.add_row(r.id, r.name, r.format, size(r.size_bytes), created, *((r.sha256,) if wide else ()))
    return table


def _progress(job) -> str:
    """Where a job is: its stage and % while it runs, its error code once failed, else its status."""
    if job.error:
        return job.error.code
    if job.status in ("running", "canceling"):
        return f"{job.stage} {job.progress:.0%}"
    return "done" if job.status == "succeeded" else "-"


def jobs_table(rows, wide: bool = False) -> Table:
    """id, status, progress (stage %, or the error code), created; --wide adds the model, priority and the error's
    message."""
    columns = ("id", "status", "progress", "created") + (("model", "priority", "error") if wide else ())
    table = _table(*columns, wide=wide)
    for j in rows:
        created = f"{j.created_at:%Y-%m-%d %H:%M:%S}" if wide else f"{j.created_at:%m-%d %H:%M}"
        extra = (j.model_id, str(j.priority if j.priority is not None else "-"),
                 j.error.message if j.error else "") if wide else ()
        table.add_row(j.id, j.status, _progress(j), created, *extra)
    return table


def _gives(gives: dict | None) -> str:
    """What a preset delivers, e.g. 'smaller file (input, safetensors), not faster: <note>'."""
    if not isinstance(gives, dict):
        return ""
    size = "smaller file" if gives.get("smaller_file") else "same size"
    speed = "faster" if gives.get("faster") else "not faster"
    formats = ", ".join(gives.get("formats") or [])
    return f"{size}{f' ({formats})' if formats else ''}, {speed}" + (f": {gives['note']}" if gives.get("note") else "")


def presets_table(presets: list[dict]) -> Table:
    table = _table("preset", "description", wide=True)  # a description reads whole, wrapped
    for p in presets:
        gives = _gives(p.get("gives"))
        table.add_row(p["name"], p["description"] + (f"\nGives: {gives}" if gives else ""))
    return table


def print_table(console, table: Table, wide: bool) -> None:
    """At the terminal's width; --wide: as wide as the table needs (the terminal wraps what does not fit)."""
    if not wide:
        return console.print(table)
    from rich.measure import Measurement

    narrow = console.width
    console.width = max(narrow, Measurement.get(console, console.options.update(max_width=10_000), table).maximum)
    try:
        console.print(table, crop=False)
    finally:
        console.width = narrow
