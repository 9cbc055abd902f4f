"""`squeeze recipes ...`: presets and validation."""

from __future__ import annotations

import typer

from squeeze_client.cli.common import (INVALID, JSON_OPTION, console, dump, fail, http_command, make_client,
                                       print_field_errors)
from squeeze_client.cli.inputs import recipe_arg
from squeeze_client.cli.tables import presets_table

recipes = typer.Typer(help="Recipe presets and validation.", no_args_is_help=True)


@recipes.command("presets")
@http_command
def recipes_presets(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """The named recipes the server knows."""
    with make_client(ctx) as client:
        presets = client.presets()
    if as_json:
        return dump(presets)
    console.print(presets_table(presets))


@recipes.command("validate")
@http_command
def recipes_validate(ctx: typer.Context,
                     recipe: str = typer.Argument(..., help="A recipe file (YAML or JSON) or a preset name."),
                     model_format: str = typer.Option(None, "--format", help="Check the outputs against this input "
                                                                              "format: pt2, onnx, package or hf."),
                     as_json: bool = JSON_OPTION) -> None:
    """Check a recipe with the server; exit 3 naming each bad field when it would be refused."""
    with make_client(ctx) as client:
        result = client.validate_recipe(recipe_arg(recipe), model_format)
    if as_json:
        dump(result)
    elif result.valid:
        console.print(f"valid; outputs: {', '.join(result.outputs or []) or 'the input format'}", highlight=False)
    print_field_errors(result.errors)
    if not result.valid:
        raise fail(INVALID, "invalid recipe")
