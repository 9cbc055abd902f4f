"""What every `squeeze` command shares: the consoles, the exit codes, the client from the root options, the mapping
of the client's errors to exit codes, --json output, and how figures are written."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

EXIT_CODES = {
    0: "success",
    1: "other error (a server error, an unexpected answer)",
    2: "usage error (a bad option, a file that does not exist)",
    3: "invalid input: the server refused it (400/404/409/413/415/422), or a recipe file does not parse",
    4: "unauthorized: missing, wrong or revoked API key",
    5: "the job failed",
    6: "the job missed its guard (guard_failed; its artifacts are still downloaded)",
    7: "the job was canceled",
    8: "timed out waiting for the job (--timeout)",
    9: "the server is unreachable",
}
OK, ERROR, USAGE, INVALID, UNAUTHORIZED, JOB_FAILED, GUARD_FAILED, CANCELED, TIMEOUT, UNREACHABLE = range(10)
# "\b" keeps click from re-wrapping the paragraph that follows it.
EXIT_CODES_HELP = ("\b\nExit codes (for pipelines):\n" + "\n".join(f"  {c}  {w}" for c, w in EXIT_CODES.items())
                   + "\n\nServer and API key: --url/--api-key, else SQUEEZE_URL/SQUEEZE_API_KEY, else url/api_key in"
                   "\n~/.config/squeeze/config.toml or config.json (SQUEEZE_CONFIG names another file).")

# No markup: what the server and the user wrote (messages, names, `[worker]` in a hint) is printed as it is; styles
# are given as Text styles.
console = Console(soft_wrap=True, markup=False)  # results on stdout; ids, keys and URLs stay copyable on one line
err = Console(stderr=True, soft_wrap=True, markup=False)  # progress and messages; stdout: results (and --json)

JSON_OPTION = typer.Option(False, "--json", help="Print the answer as JSON on stdout.")
WIDE_OPTION = typer.Option(False, "--wide", help="Every column, however wide the terminal.")


def root_options(ctx: typer.Context,
                 url: str = typer.Option(None, "--url", help="Server URL (else SQUEEZE_URL, the config file, "
                                                              "http://127.0.0.1:8000)."),
                 api_key: str = typer.Option(None, "--api-key", help="API key (else SQUEEZE_API_KEY, the config "
                                                                      "file).")) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


def make_client(ctx: typer.Context):
    from squeeze_client.client import Client

    opts = ctx.find_root().obj or {}
    try:
        return Client(opts.get("url"), opts.get("api_key"))
    except ValueError as exc:  # a config file that does not parse
        raise fail(USAGE, str(exc)) from None


def fail(code: int, message: str) -> typer.Exit:
    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    return typer.Exit(code)


def print_field_errors(errors: list[dict[str, str]]) -> None:
    for e in errors:
        err.print(f"  {e.get('field')}: {e.get('message')}", highlight=False)


def http_command(fn):
    """Maps the client's errors to the documented exit codes, with the server's message on stderr."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from squeeze_client.errors import ServerError, SqueezeError, Unauthorized, Unreachable, WaitTimeout

        try:
            return fn(*args, **kwargs)
        except Unreachable as exc:
            raise fail(UNREACHABLE, exc.message) from None
        except SqueezeError as exc:
            print_field_errors(exc.field_errors)
            code = UNAUTHORIZED if isinstance(exc, Unauthorized) else (
                ERROR if isinstance(exc, ServerError) or exc.status == 0 else INVALID)
            raise fail(code, f"{exc.message} ({exc.code}, HTTP {exc.status})") from None
        except WaitTimeout as exc:
            raise fail(TIMEOUT, f"{exc}; it goes on on the server (squeeze jobs cancel {exc.job.id} to stop it)")

    return run


def dump(value: Any) -> None:
    """--json: one JSON document on stdout."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    print(json.dumps(value, indent=2, default=str))


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def num(v: float | None, fmt: str = "{:.4g}") -> str:
    """A figure in `fmt`; never a negative zero (-0.00 is written 0.00)."""
    if v is None:
        return "-"
    text = fmt.format(v)
    if text.startswith("-") and not any(c in "123456789" for c in text):
        text = text[1:]
    return text


def signed(v: float, fmt: str) -> str:
    """`fmt` with an explicit sign, except for a figure that rounds to zero (0.00, not +0.00 or -0.00)."""
    text = num(v, fmt)
    return text if not math.isfinite(v) or any(c in "123456789" for c in text) else text.lstrip("+")
