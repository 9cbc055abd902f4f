from typing import Any

from fastapi import APIRouter, Body

from app.api.dependencies import Caller
from app.api.schemas import RecipeValidation, error_responses
from app.core.errors import APIError
from app.jobs.service import validate_recipe
from app.recipes import PRESETS, Recipe

router = APIRouter(prefix="/v1/recipes", tags=["recipes"], responses=error_responses(401))


@router.get("/presets")
def presets(_: Caller) -> dict[str, Any]:
    return {"data": [{"name": name, **p} for name, p in PRESETS.items()]}


@router.get("/schema")
def schema(_: Caller) -> dict[str, Any]:
    return Recipe.model_json_schema()


@router.post("/validate", response_model=RecipeValidation)
def validate(_: Caller, recipe: dict[str, Any] | str = Body(..., embed=True),
             model_format: str | None = Body(None, embed=True)) -> RecipeValidation:
    """Always 200: `valid` says whether the recipe (and, given `model_format`, its outputs) would be accepted."""
    if model_format not in (None, "pt2", "onnx", "package", "hf"):
        return RecipeValidation(valid=False, errors=[{"field": "model_format",
                                                      "message": "expected pt2, onnx, package or hf"}])
    try:
        parsed, outputs = validate_recipe(recipe, model_format)
    except APIError as exc:
        return RecipeValidation(valid=False, errors=exc.details.get("errors", []))
    return RecipeValidation(valid=True, recipe=parsed.model_dump(mode="json"), outputs=outputs)
