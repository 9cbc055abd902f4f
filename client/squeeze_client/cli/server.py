"""`squeeze server`, `squeeze migrate` and `squeeze keys ...`: commands of the server host. They import the server
(app.cli) only when run, so the client package works without it and says how to install it when it is missing."""

from __future__ import annotations

import typer
from rich.table import Table

from squeeze_client.cli.common import ERROR, JSON_OPTION, console, dump, fail

INSTALL_SERVER = ("this command runs the Squeeze server, which is not installed here (the squeeze-client package "
                  "is the client only): in a checkout of Squeeze run `make run`, or "
                  "`pip install -e client -e '.[worker]'` and then `squeeze server`")


def _server_side():
    """app.cli, or exit 1 saying how to install the server."""
    try:
        import app.cli as server_side
    except ImportError as exc:
        raise fail(ERROR, f"{INSTALL_SERVER} ({exc})") from None
    return server_side


def server(host: str = typer.Option(None, help="Default: SQUEEZE_HOST (127.0.0.1)."),
           port: int = typer.Option(None, help="Default: SQUEEZE_PORT (8000)."),
           workers: int = typer.Option(1, help="Worker processes to start beside the API (0: none).")) -> None:
    """Migrate the database, then run the API and a local worker until Ctrl-C (on the server host)."""
    code = _server_side().serve(host, port, workers)
    if code:
        raise typer.Exit(code)


def migrate() -> None:
    """Upgrade the database schema to the latest revision (on the server host)."""
    _server_side().migrate()
    console.print("database at head")


keys = typer.Typer(help="API keys of teams (direct database access; run on the server host).", no_args_is_help=True)


@keys.command("create")
def keys_create(team: str = typer.Option(..., help="Team name (created if new)."),
                name: str = typer.Option("default"), admin: bool = typer.Option(False),
                as_json: bool = JSON_OPTION) -> None:
    """Create an API key; the key is printed once (last line, alone)."""
    created = _server_side().create_key(team, name, admin)
    if as_json:
        return dump(created)
    console.print(f"key id {created['id']} for team {team}:", highlight=False)
    print(created["key"])


@keys.command("list")
def keys_list(as_json: bool = JSON_OPTION) -> None:
    """Every API key (its prefix, never the secret)."""
    rows = _server_side().list_keys()
    if as_json:
        return dump(rows)
    table = Table()
    for column in ("id", "team", "name", "prefix", "admin", "revoked"):
        table.add_column(column, no_wrap=column in ("id", "prefix"), overflow="fold")
    for r in rows:
        table.add_row(r["id"], r["team"], r["name"], r["prefix"], str(r["admin"]), r["revoked_at"] or "")
    console.print(table)


@keys.command("revoke")
def keys_revoke(key_id: str, as_json: bool = JSON_OPTION) -> None:
    """Revoke a key at once (it stays revoked)."""
    if not _server_side().revoke_key(key_id):
        raise fail(ERROR, f"no key {key_id}")
    if as_json:
        return dump({"id": key_id, "revoked": True})
    console.print(f"revoked {key_id}", highlight=False)
