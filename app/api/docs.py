"""/docs (Swagger UI) and /redoc (ReDoc), working offline: their scripts and styles are the files the pinned
fastapi-offline package ships, served here under /docs/static/ (no CDN), and each page's Content-Security-Policy
allows exactly what it needs: scripts and styles from this server, its own inline script or style by hash, the
OpenAPI document fetched from this server, nothing else."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from app.core.errors import not_found

STATIC = Path(str(files("fastapi_offline") / "static"))
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
PREFIX = "/docs/static"
# No validator badge: Swagger UI would load it from validator.swagger.io.
SWAGGER_PARAMETERS = {"validatorUrl": None}
# The <style> elements ReDoc adds as it runs, allowed by hash (fastapi-offline 1.7.7 ships ReDoc 2.5.3; the browser
# test fails on a violation should a new bundle change them): the empty one styled-components then fills through
# CSSOM, and perfect-scrollbar's CSS, inserted as the bundle loads.
REDOC_STYLES = (" 'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
                " 'sha256-QMIg+bpjm3JdElJ388KYke01izlUW0UoNOeKjpMxdgc='")
# ReDoc's search index runs in a worker it makes from a blob: URL.
REDOC_WORKERS = "worker-src blob:; "
# ReDoc's side menu shows Redocly's logo from its CDN: served here with an empty src, the image is hidden at once
# (its onError) and nothing is fetched.
REDOC_CDN_LOGO = b'"https://cdn.redoc.ly/redoc/logo-mini.svg"'
_INLINE = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("script", "style")}


def _hashes(html: str, tag: str) -> str:
    """CSP hash sources for the page's inline <script> or <style> blocks (those without attributes)."""
    digests = (hashlib.sha256(block.encode()).digest() for block in _INLINE[tag].findall(html))
    return "".join(f" 'sha256-{base64.b64encode(d).decode()}'" for d in digests)


def policy(html: str, more_styles: str = "", workers: str = "") -> str:
    """The page's CSP: its assets from 'self', its inline blocks by hash, images from 'self' and data: URLs (Swagger
    UI's icons), the API itself for the OpenAPI document and "Try it out"."""
    return ("default-src 'none'; "
            f"script-src 'self'{_hashes(html, 'script')}; style-src 'self'{_hashes(html, 'style')}{more_styles}; "
            f"img-src 'self' data:; connect-src 'self'; {workers}"
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _page(html: str, more_styles: str = "", workers: str = "") -> HTMLResponse:
    return HTMLResponse(html, headers={"Cache-Control": "no-cache",
                                       "Content-Security-Policy": policy(html, more_styles, workers)})


@lru_cache(maxsize=8)
def swagger_html(title: str, root: str, openapi_url: str) -> str:
    return get_swagger_ui_html(openapi_url=f"{root}{openapi_url}", title=f"{title} - Swagger UI",
                               swagger_js_url=f"{root}{PREFIX}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{PREFIX}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{PREFIX}/favicon.png",
                               swagger_ui_parameters=SWAGGER_PARAMETERS).body.decode()


@lru_cache(maxsize=8)
def redoc_html(title: str, root: str, openapi_url: str) -> str:
    return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{title} - ReDoc",
                          redoc_js_url=f"{root}{PREFIX}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{PREFIX}/favicon.png", with_google_fonts=False).body.decode()


@lru_cache(maxsize=1)
def redoc_bundle() -> bytes:
    return (STATIC / "redoc.standalone.js").read_bytes().replace(REDOC_CDN_LOGO, b'""')


def router_for(app: FastAPI) -> APIRouter:
    """The two pages and their assets; the app is made with docs_url=None, redoc_url=None."""
    router = APIRouter(tags=["docs"], include_in_schema=False)

    @router.get("/docs")
    def swagger(request: Request) -> HTMLResponse:
        return _page(swagger_html(app.title, request.scope.get("root_path", ""), app.openapi_url))

    @router.get("/redoc")
    def redoc(request: Request) -> HTMLResponse:
        return _page(redoc_html(app.title, request.scope.get("root_path", ""), app.openapi_url), REDOC_STYLES,
                     REDOC_WORKERS)

    @router.get(PREFIX + "/{name}")
    def asset(name: str) -> Response:
        if name not in ASSETS:  # an allowlist: no path ever reaches the filesystem from the URL
            raise not_found("file", name)
        headers = {"Cache-Control": "public, max-age=86400"}
        if name == "redoc.standalone.js":
            return Response(redoc_bundle(), media_type=ASSETS[name], headers=headers)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=headers)

    return router
