"""Webhook targets (SSRF rules) and the delivery queue on the real database: enqueue with the event, atomic
claims, retries with backoff, every attempt recorded, progress throttled."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.core.auth import create_key
from app.core.config import get_settings
from app.core.db import new_id, session_scope, utcnow
from app.core.tables import Job, ModelFile, WebhookDelivery
from app.webhooks import delivery, targets
from app.webhooks.signing import verify_webhook
from testing.webhook_receiver import Receiver

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data",
    "http://[::1]:8080/", "http://[::ffff:127.0.0.1]/", "http://192.168.1.5/", "http://100.64.0.1/",
    "http://0.0.0.0/", "http://2130706433/", "http://localhost:8000/", "http://api.localhost/",
])
def test_non_public_targets_are_refused(url):
    with pytest.raises(targets.UnsafeTarget, match="SQUEEZE_WEBHOOK_ALLOWLIST"):
        targets.check_url(url, [])


# IPv6 addresses that carry an IPv4 address are judged by the IPv4 rules on it (or refused whole: local NAT64).
EMBEDDED_PRIVATE = [
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::10.0.0.1",  # NAT64: 127.0.0.1, 169.254.169.254, 10.0.0.1
    "64:ff9b:1::808:808", "64:ff9b:1:7f00:1::",  # local-use NAT64: the IPv4 position is the operator's choice
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:101:1::5",  # 6to4 of 127.0.0.1, the metadata address, 192.168.1.1
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:0:7f00:1",  # IPv4-mapped, IPv4-translated
    "::7f00:1", "::a00:1", "::", "::1",  # IPv4-compatible (:: and ::1 too)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",  # Teredo, server 10.0.0.1
]
EMBEDDED_PUBLIC = ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "::ffff:0:808:808",
                   "2001:0:5db8:d822:8000:63bf:f7f7:f7f7", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", EMBEDDED_PRIVATE)
def test_ipv6_wrapping_a_private_ipv4_address_is_not_public(address):
    import ipaddress

    assert not targets.is_public(ipaddress.ip_address(address))
    with pytest.raises(targets.UnsafeTarget, match="not a public address"):
        targets.check_url(f"http://[{address}]:8080/hook", [])


@pytest.mark.parametrize("address", EMBEDDED_PUBLIC)
def test_ipv6_wrapping_a_public_ipv4_address_is_public(address):
    import ipaddress

    assert targets.is_public(ipaddress.ip_address(address))
    targets.check_url(f"http://[{address}]/hook", [])


def test_embedded_ipv4_is_unwrapped():
    import ipaddress

    def v4s(a: str) -> list[str] | None:
        found = targets.embedded_ipv4(ipaddress.IPv6Address(a))
        return None if found is None else [str(v) for v in found]

    assert v4s("64:ff9b::7f00:1") == ["127.0.0.1"] and v4s("2002:7f00:1::") == ["127.0.0.1"]
    assert v4s("::ffff:10.0.0.1") == ["10.0.0.1"] and v4s("::ffff:0:a00:1") == ["10.0.0.1"]
    assert v4s("2001:0:4136:e378:8000:63bf:80ff:fffe") == ["65.54.227.120", "127.0.0.1"]
    assert v4s("2606:4700:4700::1111") is None


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "https://user:pw@example.com/",
                                 "not a url", "http:///nohost"])
def test_only_plain_http_urls(url):
    with pytest.raises(targets.UnsafeTarget):
        targets.check_url(url, [])


def test_public_targets_and_the_allowlist():
    targets.check_url("https://example.com/hook", [])
    targets.check_url("http://93.184.216.34:8080/hook", [])
    allow = ["10.0.0.0/8", "hooks.internal", "::1/128"]
    targets.check_url("http://10.200.0.7/hook", allow)
    targets.check_url("http://[::1]/hook", allow)
    targets.check_url("http://HOOKS.internal./x", allow)
    for url in ("http://192.168.0.1/", "http://127.0.0.1/", "http://localhost/"):
        with pytest.raises(targets.UnsafeTarget):
            targets.check_url(url, allow)


def test_send_time_check_resolves_names():
    with pytest.raises(targets.UnsafeTarget, match="not a public address"):
        targets.resolve_target("http://127.0.0.1:1/", [])
    assert targets.resolve_target("http://127.0.0.1:1/", ["127.0.0.1"]) == "127.0.0.1"
    assert targets.resolve_target("http://localhost:1/", ["localhost"]) in ("127.0.0.1", "::1")


def test_backoff_doubles_and_is_capped():
    s = get_settings().model_copy(update={"webhook_retry_base_s": 10, "webhook_retry_max_s": 60})
    assert 10 <= delivery.backoff_s(1, s) <= 11 and 20 <= delivery.backoff_s(2, s) <= 22
    assert 60 <= delivery.backoff_s(10, s) <= 66


def _job(db, url: str, events=("started", "progress", "completed")) -> str:
    key, _ = create_key(db, "hooks-" + new_id("t")[-6:], "k")
    model = ModelFile(id=new_id("mdl"), team_id=key.team_id, name="m", format="onnx", sha256="0" * 64, size_bytes=1)
    db.add(model)
    db.flush()
    job = Job(id=new_id("job"), team_id=key.team_id, model_id=model.id, recipe={"steps": []}, outputs=["onnx"],
              queue="cpu", enqueued_at=utcnow(), webhook={"url": url, "events": list(events), "secret": SECRET})
    db.add(job)
    db.commit()
    return job.id


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def test_retries_until_delivered_every_attempt_recorded(configured, receiver):
    settings = get_settings().model_copy(update={"webhook_allowlist": "127.0.0.1", "webhook_retry_base_s": 0.05,
                                                 "webhook_max_attempts": 5})
    receiver.statuses["/flaky"] = [500, 500, 200]
    with session_scope() as db:
        job_id = _job(db, receiver.url + "/flaky")
        assert delivery.enqueue(db, job_id, "started", settings) == 1
        db.commit()
    with session_scope() as db:  # one claim per attempt: a second sender finds nothing due
        claimed = delivery.claim_due(db, "sender-a", settings)
        assert claimed is not None and claimed.attempt == 1
        assert delivery.claim_due(db, "sender-b", settings) is None
    with session_scope() as db:
        delivery.record(db, claimed, "sender-a", delivery.post(claimed, settings), settings)
    import time

    deadline = time.monotonic() + 10
    while len(receiver.at("/flaky")) < 3 and time.monotonic() < deadline:
        delivery.deliver_one("sender-b", settings) or time.sleep(0.02)
    got = receiver.at("/flaky")
    assert len(got) == 3
    assert len({r.headers["webhook-id"] for r in got}) == 1 and len({r.body for r in got}) == 1
    for r in got:
        verify_webhook(SECRET, r.headers, r.body)
    with session_scope() as db:
        rows = list(db.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                               .order_by(WebhookDelivery.attempt)))
    assert [(d.attempt, d.status, d.status_code) for d in rows] == [(1, "failed", 500), (2, "failed", 500),
                                                                    (3, "delivered", 200)]
    assert rows[0].response_excerpt == "answer 1: 500" and rows[2].delivered_at is not None
    assert not delivery.deliver_one("sender-b", settings)


def test_gives_up_after_max_attempts_and_refused_targets_are_not_retried(configured, receiver):
    settings = get_settings().model_copy(update={"webhook_allowlist": "127.0.0.1", "webhook_retry_base_s": 0.01,
                                                 "webhook_max_attempts": 2})
    receiver.statuses["/down"] = [503]
    with session_scope() as db:
        down = _job(db, receiver.url + "/down", ["completed"])
        refused = _job(db, "http://10.9.9.9/hook", ["completed"])  # allowed at submit by an older allowlist
        assert delivery.enqueue(db, down, "completed", settings) == 1
        assert delivery.enqueue(db, down, "started", settings) == 0  # not a chosen event
        delivery.enqueue(db, refused, "completed", settings)
        db.commit()
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with session_scope() as db:
            if not db.scalar(select(WebhookDelivery.id).where(WebhookDelivery.status == "pending")):
                break
        delivery.deliver_one("s", settings) or time.sleep(0.02)
    with session_scope() as db:
        rows = {j: [(d.attempt, d.status, d.status_code, d.error) for d in db.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == j).order_by(WebhookDelivery.attempt))]
            for j in (down, refused)}
    assert [r[:3] for r in rows[down]] == [(1, "failed", 503), (2, "failed", 503)]
    assert "gave up after 2 attempts" in rows[down][1][3]
    assert len(rows[refused]) == 1 and rows[refused][0][1] == "failed" and "refused" in rows[refused][0][3]


def test_progress_is_throttled_per_job(configured):
    settings = get_settings().model_copy(update={"webhook_progress_interval_s": 60})
    with session_scope() as db:
        job_id = _job(db, "https://hooks.example.invalid/hook")
        assert delivery.enqueue(db, job_id, "progress", settings) == 1
        db.commit()
        assert delivery.enqueue(db, job_id, "progress", settings) == 0
        assert delivery.enqueue(db, job_id, "completed", settings) == 1
        db.commit()
        unthrottled = settings.model_copy(update={"webhook_progress_interval_s": 0})
        assert delivery.enqueue(db, job_id, "progress", unthrottled) == 1
        db.commit()
