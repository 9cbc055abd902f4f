"""Webhook deliveries (docs/api.md#webhooks): rows enqueued with the job event, sent by every API and worker process.

A job event (`lifecycle.claim` -> started, `heartbeat` -> progress, `finish`/`reap`/cancel -> completed) adds one
`webhook_deliveries` row per target in the same transaction as the event, so a delivery survives any restart.
A sender thread in each process claims due rows one at a time with a conditional UPDATE (two processes never
send the same attempt), POSTs the job object as it was at the event, and records the attempt; a failed attempt
gets a successor row due after an exponential backoff, up to `webhook_max_attempts`.

Targets on non-public addresses are refused (SSRF, app/webhooks/targets.py), again at send time.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import new_id, utcnow
from app.core.tables import Job, Team, Webhook, WebhookDelivery
from app.webhooks.signing import sign
from app.webhooks.targets import UnsafeTarget, resolve_target

log = logging.getLogger("squeeze.webhooks")
EVENTS = ("started", "progress", "completed")
DEFAULT_EVENTS = ["started", "completed"]
EXCERPT = 500
USER_AGENT = "Squeeze-Webhooks/1"


# --- enqueueing (inside the caller's transaction) -------------------------------------------------------------


def enqueue(db: Session, job_id: str, event: str, settings: Settings | None = None) -> int:
    """Adds a pending delivery of `event` for each of the job's targets (its own webhook, the team's webhooks)
    that chose the event; the caller commits. `progress` is throttled per job and target."""
    settings = settings or get_settings()
    row = db.execute(select(Job.team_id, Job.webhook).where(Job.id == job_id)).one_or_none()
    if row is None:
        return 0
    team_id, own = row
    targets: list[tuple[str | None, str]] = []
    if own and event in own.get("events", ()):
        targets.append((None, own["url"]))
    for hook_id, url, events in db.execute(select(Webhook.id, Webhook.url, Webhook.events).where(
            Webhook.team_id == team_id, Webhook.deleted_at.is_(None)).order_by(Webhook.id)):
        if event in events:
            targets.append((hook_id, url))
    if not targets:
        return 0
    now = utcnow()
    if event == "progress" and settings.webhook_progress_interval_s > 0:
        since = now - timedelta(seconds=settings.webhook_progress_interval_s)
        recent = set(db.execute(select(WebhookDelivery.webhook_id, WebhookDelivery.url).where(
            WebhookDelivery.job_id == job_id, WebhookDelivery.event == "progress", WebhookDelivery.attempt == 1,
            WebhookDelivery.created_at > since)))
        targets = [t for t in targets if t not in recent]
        if not targets:
            return 0
    from app.api.views import job_out

    db.flush()  # rows added in this transaction (artifacts, events) belong in the snapshot
    job = db.get(Job, job_id, populate_existing=True)
    body = job_out(job).model_dump_json()
    for hook_id, url in targets:
        db.add(WebhookDelivery(id=new_id("whd"), message_id=new_id("msg"), job_id=job_id, webhook_id=hook_id,
                               event=event, url=url, payload=body, attempt=1, status="pending", created_at=now,
                               next_attempt_at=now))
    return len(targets)


def cancel_pending(db: Session, webhook_id: str, reason: str) -> None:
    db.execute(update(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id,
                                             WebhookDelivery.status == "pending")
               .values(status="canceled", error=reason, next_attempt_at=None))


# --- sending ---------------------------------------------------------------------------------------------------


@dataclass
class _Claimed:
    id: str
    message_id: str
    job_id: str
    webhook_id: str | None
    event: str
    url: str
    payload: str
    attempt: int
    secret: str | None


@dataclass
class Attempt:
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    permanent: bool = False  # no retry: the target is refused

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _secret_for(db: Session, d: WebhookDelivery) -> tuple[str | None, str | None]:
    """(secret, why not) for a delivery: its team webhook's, else the job's own, else the team's signing secret."""
    if d.webhook_id is not None:
        hook = db.get(Webhook, d.webhook_id)
        if hook is None or hook.deleted_at is not None:
            return None, "the webhook was deleted"
        return hook.secret, None
    job = db.get(Job, d.job_id)
    own = (job.webhook or {}).get("secret") if job is not None else None
    if own:
        return own, None
    team = db.get(Team, job.team_id) if job is not None else None
    if team is not None and team.webhook_secret:
        return team.webhook_secret, None
    return None, "no signing secret (the job's webhook has none and the team has no signing secret)"


def claim_due(db: Session, sender: str, settings: Settings) -> _Claimed | None:
    """Takes the next due delivery for this sender; a claim older than a few timeouts (its sender died mid-send)
    may be taken over, so a crash delays an attempt but never loses it."""
    now = utcnow()
    stale = now - timedelta(seconds=4 * settings.webhook_timeout_s + 30)
    free = or_(WebhookDelivery.claimed_by.is_(None), WebhookDelivery.claimed_at < stale)
    candidates = list(db.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now, free)
        .order_by(WebhookDelivery.next_attempt_at).limit(5)))
    for ident in candidates:
        taken = db.execute(update(WebhookDelivery).where(WebhookDelivery.id == ident,
                                                         WebhookDelivery.status == "pending", free)
                           .values(claimed_by=sender, claimed_at=now)).rowcount
        if not taken:
            continue
        d = db.get(WebhookDelivery, ident, populate_existing=True)
        secret, why_not = _secret_for(db, d)
        if secret is None:
            d.status, d.error, d.next_attempt_at = "canceled", why_not, None
            db.commit()
            continue
        db.commit()
        return _Claimed(id=d.id, message_id=d.message_id, job_id=d.job_id, webhook_id=d.webhook_id, event=d.event,
                        url=d.url, payload=d.payload, attempt=d.attempt, secret=secret)
    db.commit()
    return None


def post(d: _Claimed, settings: Settings, now: float | None = None) -> Attempt:
    """One signed POST to the checked address, no redirects, no proxies from the environment."""
    try:
        address = resolve_target(d.url, settings.webhook_allowed)
    except UnsafeTarget as exc:
        return Attempt(error=f"refused: {exc}", permanent=True)
    except OSError as exc:
        return Attempt(error=f"DNS: {exc}")
    url = httpx.URL(d.url)
    timestamp = str(int(time.time() if now is None else now))
    headers = {"content-type": "application/json", "user-agent": USER_AGENT, "host": url.netloc.decode("ascii"),
               "webhook-id": d.message_id, "webhook-timestamp": timestamp,
               "webhook-signature": sign(d.secret, d.message_id, timestamp, d.payload.encode()),
               "squeeze-event": d.event, "squeeze-attempt": str(d.attempt)}
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    try:
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("POST", url.copy_with(host=address), content=d.payload.encode(), headers=headers,
                               extensions=extensions) as response:
                excerpt = b""
                for chunk in response.iter_bytes():
                    excerpt += chunk
                    if len(excerpt) >= EXCERPT:
                        break
                return Attempt(status_code=response.status_code,
                               excerpt=excerpt[:EXCERPT].decode("utf-8", "replace") or None)
    except Exception as exc:  # any failure is this attempt's outcome, recorded; never a claim left hanging
        return Attempt(error=f"{type(exc).__name__}: {exc}"[:EXCERPT])


def backoff_s(attempt: int, settings: Settings) -> float:
    """The wait after failed attempt `attempt` (1-based): base * 2**(attempt-1), capped, plus up to 10% jitter."""
    delay = min(settings.webhook_retry_base_s * 2 ** (attempt - 1), settings.webhook_retry_max_s)
    return delay * (1 + 0.1 * random.random())


def record(db: Session, d: _Claimed, sender: str, result: Attempt, settings: Settings) -> None:
    now = utcnow()
    if result.ok:
        status, error = "delivered", None
    else:
        status = "failed"
        error = result.error or f"HTTP {result.status_code}"
        if not result.permanent and d.attempt >= settings.webhook_max_attempts:
            error += f" (gave up after {d.attempt} attempts)"
    done = db.execute(update(WebhookDelivery).where(WebhookDelivery.id == d.id, WebhookDelivery.claimed_by == sender,
                                                    WebhookDelivery.status == "pending")
                      .values(status=status, status_code=result.status_code, response_excerpt=result.excerpt,
                              error=error, sent_at=now, delivered_at=now if result.ok else None,
                              next_attempt_at=None)).rowcount
    if done and not result.ok and not result.permanent and d.attempt < settings.webhook_max_attempts:
        db.add(WebhookDelivery(id=new_id("whd"), message_id=d.message_id, job_id=d.job_id, webhook_id=d.webhook_id,
                               event=d.event, url=d.url, payload=d.payload, attempt=d.attempt + 1, status="pending",
                               created_at=now, next_attempt_at=now + timedelta(seconds=backoff_s(d.attempt,
                                                                                                 settings))))
    db.commit()
    log.info("webhook %s %s attempt %d: %s", d.event, d.url, d.attempt, error or result.status_code,
             extra={"job_id": d.job_id, "delivery_id": d.id, "status_code": result.status_code})


def deliver_one(sender: str, settings: Settings) -> bool:
    """Claims, sends and records one due delivery; False when none is due."""
    from app.core.db import session_scope

    with session_scope() as db:
        claimed = claim_due(db, sender, settings)
    if claimed is None:
        return False
    result = post(claimed, settings)
    with session_scope() as db:
        record(db, claimed, sender, result, settings)
    return True


def pending_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == "pending"))


def start_sender(stop: threading.Event, settings: Settings | None = None) -> None:
    """Sends due deliveries in a daemon thread until `stop` is set (one per process; they share the table)."""
    settings = settings or get_settings()
    sender = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"

    def loop() -> None:
        while not stop.wait(settings.webhook_poll_interval_s):
            try:
                while not stop.is_set() and deliver_one(sender, settings):
                    pass
            except Exception as exc:  # a DB outage: the next poll tries again
                log.warning("webhook sender: %s", exc)

    threading.Thread(target=loop, name="webhook-sender", daemon=True).start()
