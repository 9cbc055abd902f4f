"""Signing and verifying Squeeze webhooks (the Standard Webhooks scheme). No server imports: a receiver can
copy this file, or use it through the client (`from squeeze_client import verify_webhook`: the client package ships
this very file, client/squeeze_client/webhooks.py being a link to it).

A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`:
`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, several space-separated when a secret rotates.
A secret `whsec_<base64>` signs with its decoded bytes (as Standard Webhooks libraries do); any other
string signs with its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(ValueError):
    pass


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error:
            pass  # not base64 after all: the whole string is the key
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int | str, body: bytes | str) -> str:
    """The `webhook-signature` value for one message."""
    payload = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str, tolerance_s: float = 300,
                   now: float | None = None) -> None:
    """Raises WebhookVerificationError unless the signature matches (compared in constant time) and the
    timestamp is within `tolerance_s` of now (a replayed old delivery fails). `headers` may use any case."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not timestamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is {current - ts:.0f} s off (tolerance {tolerance_s} s)")
    expected = sign(secret, msg_id, timestamp, body).encode()
    matched = False
    for candidate in signatures.split():
        if candidate.startswith("v1,"):  # no early exit: every candidate is compared
            matched |= hmac.compare_digest(candidate.encode(), expected)
    if not matched:
        raise WebhookVerificationError("no matching v1 signature")
