"""Team webhooks, the team's signing secret, per-job webhooks at submit, and the delivery records of a job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api.schemas import JobWebhook, WebhookCreate
from app.core.auth import Principal, owned
from app.core.config import Settings
from app.core.db import new_id, utcnow
from app.core.errors import APIError, not_found
from app.core.tables import Job, Team, Webhook, WebhookDelivery
from app.webhooks.delivery import cancel_pending
from app.webhooks.signing import new_secret
from app.webhooks.targets import UnsafeTarget, check_url


def _unsafe(field: str, exc: UnsafeTarget) -> APIError:
    return APIError(422, "invalid_webhook", f"{field}: {exc}", {"errors": [{"field": field, "message": str(exc)}]})


def check_job_webhook(db: Session, settings: Settings, principal: Principal, hook: JobWebhook | None
                      ) -> dict[str, Any] | None:
    """A job's own webhook -> what the job row stores, or the 422 naming the field."""
    if hook is None:
        return None
    try:
        check_url(hook.url, settings.webhook_allowed)
    except UnsafeTarget as exc:
        raise _unsafe("webhook.url", exc) from None
    if hook.secret is None:
        team = db.get(Team, principal.team_id)
        if team is None or not team.webhook_secret:
            msg = "give webhook.secret, or create the team's signing secret (POST /v1/webhooks/signing-secret)"
            raise APIError(422, "invalid_webhook", f"webhook.secret: {msg}",
                           {"errors": [{"field": "webhook.secret", "message": msg}]})
    stored: dict[str, Any] = {"url": hook.url, "events": list(dict.fromkeys(hook.events))}
    if hook.secret:
        stored["secret"] = hook.secret
    return stored


def create_webhook(db: Session, settings: Settings, principal: Principal, body: WebhookCreate) -> Webhook:
    try:
        check_url(body.url, settings.webhook_allowed)
    except UnsafeTarget as exc:
        raise _unsafe("url", exc) from None
    count = db.scalar(select(func.count()).select_from(Webhook).where(Webhook.team_id == principal.team_id,
                                                                      Webhook.deleted_at.is_(None)))
    if count >= settings.webhook_max_per_team:
        raise APIError(409, "too_many_webhooks", f"a team may have at most {settings.webhook_max_per_team} "
                                                 "webhooks; delete one first", {"limit": settings.webhook_max_per_team})
    hook = Webhook(id=new_id("whk"), team_id=principal.team_id, url=body.url, events=list(dict.fromkeys(body.events)),
                   secret=new_secret(), description=body.description)
    db.add(hook)
    db.commit()
    return hook


def list_webhooks(db: Session, principal: Principal) -> list[Webhook]:
    return list(db.scalars(select(Webhook).where(Webhook.team_id == principal.team_id, Webhook.deleted_at.is_(None))
                           .order_by(Webhook.id)))


def delete_webhook(db: Session, principal: Principal, webhook_id: str) -> None:
    """Stops the webhook; its pending deliveries are canceled, its records kept."""
    hook = owned(db.get(Webhook, webhook_id), principal)
    if hook is None:
        raise not_found("webhook", webhook_id)
    hook.deleted_at = utcnow()
    cancel_pending(db, hook.id, "the webhook was deleted")
    db.commit()


def rotate_signing_secret(db: Session, principal: Principal) -> str:
    team = db.get(Team, principal.team_id)
    team.webhook_secret = new_secret()
    db.commit()
    return team.webhook_secret


def list_deliveries(db: Session, principal: Principal, job_id: str) -> list[WebhookDelivery]:
    job = db.get(Job, job_id)
    if job is None or job.team_id != principal.team_id:
        raise not_found("job", job_id)
    return list(db.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                           .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
