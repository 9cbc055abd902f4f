"""The web dashboard: one static page (HTML + JS + CSS, no framework) over the same HTTP API.

The page holds no data and needs no session: it asks for the team's API key and sends it as a Bearer header on
every API call, so the dashboard sees exactly what that key sees.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.core.errors import not_found

STATIC = Path(__file__).resolve().parents[2] / "dashboard"  # app/dashboard: the page, its script and style
_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:"})


@router.get("/dashboard/static/{name}")
def asset(name: str) -> FileResponse:
    if name not in _FILES:  # an allowlist: no path ever reaches the filesystem from the URL
        raise not_found("file", name)
    return FileResponse(STATIC / name, media_type=_FILES[name], headers={"Cache-Control": "no-cache",
                                                                       "X-Content-Type-Options": "nosniff"})
