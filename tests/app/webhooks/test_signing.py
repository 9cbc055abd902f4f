"""Webhook signatures (Standard Webhooks): known answers computed independently, the timestamp window."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from app.webhooks.signing import WebhookVerificationError, new_secret, secret_key, sign, verify_webhook

KEY = bytes(range(24))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
BODY = b'{"id":"job_1","status":"succeeded"}'
NOW = 1_700_000_000


def _expected(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    return "v1," + base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()


def _headers(signature: str, ts: int = NOW, msg_id: str = "msg_1") -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_signature_known_answer():
    assert secret_key(SECRET) == KEY
    assert sign(SECRET, "msg_1", NOW, BODY) == _expected(KEY, "msg_1", NOW, BODY)
    # The Standard Webhooks specification's own example.
    spec_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    spec_body = b'{"test": 2432232314}'
    assert sign(spec_secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, spec_body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    # A secret without the whsec_ prefix signs with its own bytes.
    assert sign("plain-secret-of-mine", "m", NOW, BODY) == _expected(b"plain-secret-of-mine", "m", NOW, BODY)


def test_verify_accepts_a_good_delivery_in_any_header_case():
    sig = _expected(KEY, "msg_1", NOW, BODY)
    verify_webhook(SECRET, _headers(sig), BODY, now=NOW)
    verify_webhook(SECRET, {k.title(): v for k, v in _headers(sig).items()}, BODY.decode(), now=NOW + 299)
    verify_webhook(SECRET, _headers(f"v1,bm9wZQ== {sig}"), BODY, now=NOW)  # one of several (a rotation)


@pytest.mark.parametrize("change", ["body", "id", "secret", "timestamp_signed", "missing"])
def test_verify_refuses_tampering(change):
    sig = _expected(KEY, "msg_1", NOW, BODY)
    headers, body, secret = _headers(sig), BODY, SECRET
    if change == "body":
        body = BODY.replace(b"succeeded", b"failed")
    elif change == "id":
        headers["webhook-id"] = "msg_2"
    elif change == "secret":
        secret = new_secret()
    elif change == "timestamp_signed":
        headers["webhook-timestamp"] = str(NOW + 1)
    else:
        del headers["webhook-signature"]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, body, now=NOW)


def test_timestamp_tolerance():
    old = NOW - 301
    headers = _headers(_expected(KEY, "msg_1", old, BODY), ts=old)
    with pytest.raises(WebhookVerificationError, match="off"):
        verify_webhook(SECRET, headers, BODY, now=NOW)
    verify_webhook(SECRET, headers, BODY, tolerance_s=400, now=NOW)
    future = NOW + 301
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, _headers(_expected(KEY, "msg_1", future, BODY), ts=future), BODY, now=NOW)


def test_new_secrets_are_random_and_decodable():
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("whsec_") and len(secret_key(a)) == 24
