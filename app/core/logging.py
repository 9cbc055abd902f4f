"""Logging for the API and the worker: one JSON object per line (SQUEEZE_LOG_FORMAT=json, the default) or plain
text, with the request id (API) and the job id (worker) of the code that logged, taken from context variables.

A JSON line has `time` (UTC, ISO 8601), `level`, `logger`, `message`, then `request_id` / `job_id` when set,
any `extra={...}` fields, and `exc` (the traceback) for exceptions.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

from app.core.config import Settings, get_settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "context"}
_QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: logged at DEBUG only
access_log = logging.getLogger("squeeze.http")


class ContextFilter(logging.Filter):
    """Adds request_id and job_id from the context (an explicit extra wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        ids = [f"{k}={v}" for k in ("request_id", "job_id") if (v := getattr(record, k))]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
               .replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def configure_logging(settings: Settings | None = None) -> None:
    """Installs the one root handler (replacing a previous one of ours, leaving others alone) and routes
    uvicorn's loggers through it."""
    settings = settings or get_settings()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_squeeze", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._squeeze = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class RequestContextMiddleware:
    """Honours the caller's X-Request-ID (or makes one), echoes it on the response, sets it for every log line
    of the request, and logs one access line per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = given if given and _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            route = getattr(scope.get("route"), "path", None)
            level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(level, "%s %s %s", scope.get("method"), path, status,
                               extra={"method": scope.get("method"), "path": path, "route": route, "status": status,
                                      "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
            request_id_var.reset(token)
