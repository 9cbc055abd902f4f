"""Recipe JSON (or a preset name) to a typed Recipe, with errors that name the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from app.recipes.presets import PRESETS
from app.recipes.recipe import Recipe
from app.recipes.steps import STEP_TAGS


class RecipeError(ValueError):
    """A recipe that does not validate; `errors` is a list of {field, message}."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


def field_path(loc: tuple[Any, ...]) -> str:
    """('steps', 2, 'prune', 'sparsity') -> 'steps[2].sparsity' (pydantic's union tag is dropped)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[i - 2] == "steps" and isinstance(loc[i - 1], int) and part in STEP_TAGS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_recipe(value: Any) -> Recipe:
    """A preset name or a recipe object -> Recipe, or RecipeError naming the fields."""
    if isinstance(value, str):
        if value not in PRESETS:
            raise RecipeError([{"field": "recipe", "message": f"unknown preset {value!r}; presets: {sorted(PRESETS)}"}])
        value = PRESETS[value]["recipe"]
    try:
        return Recipe.model_validate(value)
    except ValidationError as exc:
        raise RecipeError(
            [{"field": field_path(tuple(e["loc"])) or "recipe", "message": e["msg"]} for e in exc.errors()]
        ) from None
