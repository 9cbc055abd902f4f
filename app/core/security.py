"""Security middleware: response headers on every answer, request body caps, and CORS (off unless configured).

- Every HTTP response gets `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, `X-Frame-Options:
  DENY`, and a Content-Security-Policy that allows nothing (`default-src 'none'`) unless the route set its own
  (the dashboard page does: it needs its scripts).
- A request body is capped at `max_body_bytes` (JSON and every other body) with a 413 `too_large`: a declared
  `Content-Length` over the cap is refused before a byte is read; a chunked body is cut off as it crosses it.
  Routes that document a binary request body (the model and dataset uploads) stream it themselves under
  `max_upload_bytes` (app/files/receive.py), so the cap does not apply to them.
- CORS: no `Access-Control-Allow-Origin` is ever sent unless `cors_origins` lists origins.
"""

from __future__ import annotations

import json
import re

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import compile_path

from app.core.config import get_settings
from app.core.errors import error_body

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# An API answer is data, never a document: nothing may load, run or frame it.
JSON_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


class _BodyTooLarge(Exception):
    pass


def _streams_body(route) -> bool:
    """A route that documents a binary request body reads (and limits) the stream itself."""
    extra = getattr(route, "openapi_extra", None) or {}
    content = (extra.get("requestBody") or {}).get("content") or {}
    return "application/octet-stream" in content


class SecurityMiddleware:
    def __init__(self, app, fastapi_app: FastAPI):
        self.app = app
        self.fastapi_app = fastapi_app
        self._streaming: list[tuple[re.Pattern, set[str]]] | None = None

    def _is_streaming(self, scope) -> bool:
        if self._streaming is None:  # built on the first request: the routers are all included by then
            self._streaming = [(compile_path(r.path)[0], set(r.methods or ()))
                               for r in iter_route_contexts(self.fastapi_app.routes) if _streams_body(r)]
        path, method = scope.get("path", ""), scope.get("method", "")
        return any(method in methods and regex.match(path) for regex, methods in self._streaming)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", JSON_CSP))
                message["headers"] = headers
            await send(message)

        try:
            await self._call(scope, receive, send_with_headers)
        except Exception:
            # Starlette answers an unhandled error outside every middleware (its ServerErrorMiddleware): answer the
            # 500 here so that it carries the headers too; the error still goes up to be logged.
            if not started:
                await _error(send_with_headers, 500, "internal", "internal server error")
            raise

    async def _call(self, scope, receive, send_with_headers):
        if self._is_streaming(scope):
            await self.app(scope, receive, send_with_headers)
            return

        limit = get_settings().max_body_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send_with_headers, limit)
            return

        received, overflow, replied = 0, False, False

        async def limited_receive():
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal replied
            if overflow:  # whatever the app made of the cut-off body, the answer is the 413 below
                return
            replied = replied or message["type"] == "http.response.start"
            await send_with_headers(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if overflow and not replied:
            await _too_large(send_with_headers, limit)


async def _error(send, status: int, code: str, message: str, details: dict | None = None) -> None:
    body = json.dumps(error_body(code, message, details)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send, limit: int) -> None:
    await _error(send, 413, "too_large", f"request body exceeds the limit of {limit} bytes", {"limit_bytes": limit})


def install(app: FastAPI) -> None:
    """Registers the middleware; CORS only when `cors_origins` lists origins."""
    app.add_middleware(SecurityMiddleware, fastapi_app=app)
    origins = get_settings().cors_origin_list
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
                           expose_headers=["ETag", "Idempotent-Replayed", "X-Request-ID"])
