"""`squeeze models ...` and `squeeze datasets ...`: upload, list, show, download, delete (the same for both)."""

from __future__ import annotations

from pathlib import Path

import typer

from squeeze_client.cli.common import JSON_OPTION, WIDE_OPTION, console, dump, http_command, make_client, size
from squeeze_client.cli.tables import file_table, print_table


def _calls(client, kind: str) -> dict:
    """The client's methods for one kind of file, by verb."""
    if kind == "models":
        return {"upload": client.upload_model, "list": client.list_models, "get": client.get_model,
                "download": client.download_model, "delete": client.delete_model}
    return {"upload": client.upload_dataset, "list": client.list_datasets, "get": client.get_dataset,
            "download": client.download_dataset, "delete": client.delete_dataset}


def file_commands(kind: str, help_text: str) -> typer.Typer:
    """upload / list / show / download / delete for `kind` (models or datasets)."""
    group = typer.Typer(help=help_text, no_args_is_help=True)
    one = kind[:-1]

    @group.command("upload", help=f"Upload a {one} (streamed; prints its id).")
    @http_command
    def upload(ctx: typer.Context, path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
               name: str = typer.Option(None, help="Name to keep (default: the file name)."),
               reuse: bool = typer.Option(False, "--reuse", help="Answer the team's file with the same SHA-256 "
                                                                 "instead of sending it again."),
               as_json: bool = JSON_OPTION) -> None:
        with make_client(ctx) as client:
            row = _calls(client, kind)["upload"](path, name, reuse=reuse)
        if as_json:
            return dump(row)
        console.print(f"{row.id}  {row.name}  {row.format}  {size(row.size_bytes)}", highlight=False)

    @group.command("list", help=f"List your team's {kind}, newest first.")
    @http_command
    def list_(ctx: typer.Context, limit: int = typer.Option(50, min=1, max=200), wide: bool = WIDE_OPTION,
              as_json: bool = JSON_OPTION) -> None:
        with make_client(ctx) as client:
            page = _calls(client, kind)["list"](limit)
        if as_json:
            return dump(page)
        print_table(console, file_table(page.data, wide), wide)

    @group.command("show", help=f"Show one {one} and what the server read from it.")
    @http_command
    def show(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID"), as_json: bool = JSON_OPTION) -> None:
        with make_client(ctx) as client:
            row = _calls(client, kind)["get"](ident)
        if as_json:
            return dump(row)
        console.print(file_table([row], wide=True))
        if row.details:
            console.print_json(data=row.details)

    @group.command("download", help=f"Download a {one} (checked against its SHA-256).")
    @http_command
    def download(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID"),
                 output: Path = typer.Option(Path("."), "--output", "-o", help="A file, or a folder to write into."),
                 as_json: bool = JSON_OPTION) -> None:
        with make_client(ctx) as client:
            path = _calls(client, kind)["download"](ident, output)
        if as_json:
            return dump({"id": ident, "path": str(path)})
        console.print(f"wrote {path}", highlight=False)

    @group.command("delete", help=f"Delete a {one}.")
    @http_command
    def delete(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID"), as_json: bool = JSON_OPTION) -> None:
        with make_client(ctx) as client:
            _calls(client, kind)["delete"](ident)
        if as_json:
            return dump({"id": ident, "deleted": True})
        console.print(f"deleted {ident}", highlight=False)

    return group


models = file_commands("models", "Uploaded models of your team.")
datasets = file_commands("datasets", "Uploaded datasets of your team (.npz / .safetensors arrays; .txt / .jsonl / "
                         ".parquet text for language models).")
