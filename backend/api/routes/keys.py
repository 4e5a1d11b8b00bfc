"""``/keys/webhook-secret``: the secret the calling key's webhook deliveries are signed with; read or rotate it.

Made on first use (reading it, or submitting a job with ``webhook_url``). Anyone holding the key may read it:
the key is the credential, the secret only lets receivers tell genuine deliveries from forged ones.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from backend.api.deps import CurrentKey, SessionDep
from backend.schemas import WebhookSecretPublic, error_responses
from backend.services import webhooks
from echo4o.db import webhooks as records
from echo4o.logging import get_logger

router = APIRouter(prefix="/keys", tags=["keys"])
log = get_logger(__name__)

_NO_STORE = {"Cache-Control": "no-store"}


@router.get("/webhook-secret", response_model=WebhookSecretPublic, responses=error_responses(401))
def get_webhook_secret(response: Response, session: SessionDep, principal: CurrentKey) -> WebhookSecretPublic:
    """This key's webhook secret (see docs/api.md, "Webhooks", for how a receiver checks a signature)."""
    response.headers.update(_NO_STORE)
    return WebhookSecretPublic.model_validate(webhooks.secret_view(session, principal.owner))


@router.post("/webhook-secret", response_model=WebhookSecretPublic, responses=error_responses(401))
def rotate_webhook_secret(response: Response, session: SessionDep, principal: CurrentKey) -> WebhookSecretPublic:
    """A new webhook secret for this key; deliveries from now on (retries included) are signed with it."""
    records.rotate_secret(session=session, owner=principal.owner)
    log.info("webhook secret rotated", extra={"owner": principal.owner})
    response.headers.update(_NO_STORE)
    return WebhookSecretPublic.model_validate(webhooks.secret_view(session, principal.owner))
