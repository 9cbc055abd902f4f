"""The `squeeze` command: over HTTP through squeeze_client.Client, upload models and datasets, compress, and follow
jobs (from any machine or pipeline); on the server host, run the server and manage API keys (those commands import
the server only when run)."""

from __future__ import annotations

import typer

from squeeze_client.cli import compress, files, jobs, recipes, server
from squeeze_client.cli.common import EXIT_CODES_HELP, root_options

cli = typer.Typer(help="Squeeze: a self-hosted model-compression server.", no_args_is_help=True,
                  epilog=EXIT_CODES_HELP, rich_markup_mode=None)
cli.callback()(root_options)
cli.command()(compress.compress)
cli.add_typer(files.models, name="models")
cli.add_typer(files.datasets, name="datasets")
cli.add_typer(jobs.jobs, name="jobs")
cli.add_typer(recipes.recipes, name="recipes")
cli.command()(server.server)
cli.command("migrate")(server.migrate)
cli.add_typer(server.keys, name="keys")


def main() -> None:
    cli()
