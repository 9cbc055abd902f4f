"""The one exception type the engine raises for user-side failures; the sandbox maps `code` to its error line."""

from __future__ import annotations

import contextlib
from typing import Iterator

# Codes the sandbox reports with exit status 2 (the user's model, data or recipe, not our bug).
USER_CODES = frozenset({"bad_model", "bad_dataset", "no_effect", "unsupported", "unsupported_pattern", "diverged",
                        "bad_teacher", "device_unavailable", "runtime_unavailable"})


class EngineError(Exception):
    """A failure caused by the job's inputs. `code` is one of USER_CODES; `message` says what to fix."""

    def __init__(self, code: str, message: str):
        if code not in USER_CODES:
            raise ValueError(f"unknown engine error code {code!r}")
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@contextlib.contextmanager
def blame(code: str, what: str) -> Iterator[None]:
    """Turn any failure inside into EngineError(code): for code paths that run the user's model or data."""
    try:
        yield
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(code, f"{what}: {type(exc).__name__}: {str(exc)[:2000]}") from exc
