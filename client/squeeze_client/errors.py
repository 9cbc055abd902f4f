"""The errors the client raises: every error answer of the server is a SqueezeError subclass carrying its HTTP
status and the `{"error": {code, message, details}}` the server sent."""

from __future__ import annotations

from typing import Any

import httpx


class SqueezeError(Exception):
    """An error answer of the server: its HTTP status and the `{"error": {code, message, details}}` it sent."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}

    @property
    def field_errors(self) -> list[dict[str, str]]:
        """[{field, message}] of a validation error (422), else []."""
        return list(self.details.get("errors") or [])


class BadRequest(SqueezeError):  # 400
    pass


class Unauthorized(SqueezeError):  # 401, and 403 (an admin-only route with a team key)
    pass


class NotFound(SqueezeError):  # 404: unknown, or another team's
    pass


class Conflict(SqueezeError):  # 409
    pass


class TooLarge(SqueezeError):  # 413
    pass


class Unsupported(SqueezeError):  # 415: an upload the server will not take (pickles, TorchScript)
    pass


class Invalid(SqueezeError):  # 422: a field names what is wrong (details.errors)
    pass


class ServerError(SqueezeError):  # 5xx
    pass


class Unreachable(SqueezeError):
    """No answer at all: connection refused, DNS, TLS, or a timeout."""

    def __init__(self, url: str, reason: str):
        super().__init__(0, "unreachable", f"cannot reach the Squeeze server at {url}: {reason}")


class WaitTimeout(TimeoutError):
    """wait() gave up before the job ended; `job` is the last state seen."""

    def __init__(self, job: Any, timeout: float):
        super().__init__(f"job {job.id} still {job.status} after {timeout:g}s")
        self.job = job


_BY_STATUS: dict[int, type[SqueezeError]] = {400: BadRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound,
                                             409: Conflict, 413: TooLarge, 415: Unsupported, 422: Invalid}


def raise_for(response: httpx.Response) -> None:
    """Raises the SqueezeError subclass of an error answer; a success (or 304) passes."""
    if response.is_success or response.status_code == 304:
        return
    response.read()
    try:
        err = response.json()["error"]
        code, message, details = str(err["code"]), str(err["message"]), err.get("details") or {}
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", f"HTTP {response.status_code}: {response.text[:500]}", {}
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else SqueezeError)
    raise cls(status, code, message, details)
