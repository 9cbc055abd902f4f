"""Webhooks: a team's standing webhooks, its signing secret, and the delivery records of a job."""

from fastapi import APIRouter

from app.api.dependencies import Caller, ReadDb, WriteDb
from app.api.schemas import (
    DeliveryList,
    DeliveryOut,
    SigningSecret,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookOut,
    error_responses,
)
from app.core.config import get_settings
from app.core.tables import Webhook, WebhookDelivery
from app.webhooks import service as webhooks

router = APIRouter(tags=["webhooks"], responses=error_responses(401))


def _out(hook: Webhook) -> WebhookOut:
    return WebhookOut(id=hook.id, url=hook.url, events=hook.events, description=hook.description,
                      created_at=hook.created_at)


def _delivery(d: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(id=d.id, message_id=d.message_id, webhook_id=d.webhook_id, event=d.event, url=d.url,
                       attempt=d.attempt, status=d.status, status_code=d.status_code,
                       response_excerpt=d.response_excerpt, error=d.error, created_at=d.created_at,
                       next_attempt_at=d.next_attempt_at, sent_at=d.sent_at, delivered_at=d.delivered_at)


@router.post("/v1/webhooks", status_code=201, response_model=WebhookCreated, responses=error_responses(409, 422))
def create(body: WebhookCreate, db: WriteDb, principal: Caller) -> WebhookCreated:
    """Every job of the team delivers the chosen events here; the secret is shown only in this response."""
    hook = webhooks.create_webhook(db, get_settings(), principal, body)
    return WebhookCreated(**_out(hook).model_dump(), secret=hook.secret)


@router.get("/v1/webhooks", response_model=WebhookList, responses=error_responses(422))
def list_(db: ReadDb, principal: Caller) -> WebhookList:
    return WebhookList(data=[_out(h) for h in webhooks.list_webhooks(db, principal)])


@router.delete("/v1/webhooks/{webhook_id}", status_code=204, responses=error_responses(404))
def delete(webhook_id: str, db: WriteDb, principal: Caller) -> None:
    webhooks.delete_webhook(db, principal, webhook_id)


@router.post("/v1/webhooks/signing-secret", status_code=201, response_model=SigningSecret,
             responses=error_responses(422))
def signing_secret(db: WriteDb, principal: Caller) -> SigningSecret:
    """A new team signing secret for job webhooks submitted without their own; it replaces the old one at once."""
    return SigningSecret(secret=webhooks.rotate_signing_secret(db, principal))


@router.get("/v1/jobs/{job_id}/webhook-deliveries", response_model=DeliveryList, responses=error_responses(404))
def deliveries(job_id: str, db: ReadDb, principal: Caller) -> DeliveryList:
    """Every attempt to deliver the job's events, oldest first (a retry is a new row with the same message_id)."""
    return DeliveryList(data=[_delivery(d) for d in webhooks.list_deliveries(db, principal, job_id)])
