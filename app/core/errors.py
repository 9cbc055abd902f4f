"""One error shape everywhere: {"error": {"code", "message", "details"}} with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.blobs.store import StorageFull
from app.core.db import database_unreachable

log = logging.getLogger("squeeze.api")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}
        self.headers = headers  # e.g. Retry-After on a 429


def not_found(kind: str, ident: str) -> APIError:
    # Another team's id is indistinguishable from an unknown one (docs/api.md, Keys and teams).
    return APIError(404, "not_found", f"{kind} {ident!r} not found", {"id": ident})


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(p) for p in loc)


def _allowed_methods(request: Request) -> str:
    """Every method of every route on this path: Starlette's own 405 names only the first route's (one path served
    by two routes, e.g. GET and POST /v1/webhooks, advertised half of its methods; found by schemathesis)."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import compile_path

    matches = [(route.path.count("{"), route.methods) for route in iter_route_contexts(request.app.routes)
               if route.path and route.methods and compile_path(route.path)[0].match(request.url.path)]
    # The most specific templates name the resource: /v1/webhooks/signing-secret, not /v1/webhooks/{webhook_id}.
    fewest = min((params for params, _ in matches), default=0)
    return ", ".join(sorted({m for params, methods in matches if params == fewest for m in methods}))


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _location(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse(error_body("invalid_request", msg, {"errors": errors}), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 400: "bad_request"}
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body" (e.g. bytes that are not UTF-8): the same answer as malformed JSON.
            return JSONResponse(error_body("invalid_request", "body: not valid JSON",
                                           {"errors": [{"field": "body", "message": "not valid JSON"}]}),
                                status_code=422)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return JSONResponse(
            error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
            status_code=exc.status_code,
            headers=headers or None,
        )

    @app.exception_handler(DBAPIError)
    async def _db_down(_: Request, exc: DBAPIError) -> JSONResponse:
        if database_unreachable(exc):
            log.warning("database unavailable: %s", exc.orig)
            return JSONResponse(
                error_body("database_unavailable", "the database is unavailable; retry shortly"),
                status_code=503,
                headers={"Retry-After": "2"},
            )
        log.exception("database error")
        return JSONResponse(error_body("internal", "internal database error"), status_code=500)

    @app.exception_handler(StorageFull)
    async def _storage_full(_: Request, exc: StorageFull) -> JSONResponse:
        # The disk under the blob store or the upload temp dir is full: the client's request was fine and may
        # succeed once an operator frees space, so not a 500. Nothing partial was kept (app/files/receive.py,
        # app/blobs/store.py). The path stays in the log, not in the answer.
        log.error("storage full: %s", exc)
        return JSONResponse(error_body("storage_full", "the server has no storage space left for this request; "
                                                       "nothing was stored"), status_code=507)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)
