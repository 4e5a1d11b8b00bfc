"""``POST /admin/finetune``: queue a fine-tuning run (admin keys only).

The run is an ordinary job on the ``train`` queue: ``GET /jobs/{id}`` shows it, ``GET /jobs/{id}/events``
streams its progress (stage ``train``: step/total and ``detail`` with loss, lr, samples_per_s, eta_s,
skipped_rows and the loss curve ``losses``), ``DELETE /jobs/{id}`` cancels it. Its result names the new
model version, registered and ready to promote (``POST /admin/models/{ref}/promote``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from backend.api.deps import AdminKey, MetricsDep, SettingsDep
from backend.schemas import JobCreated, error_responses
from backend.services import webhooks
from backend.services.blocking import in_session
from backend.services.finetune import submit_finetune
from backend.services.views import base_url, created
from echo4o.jobs import FinetuneJob

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/finetune", status_code=202, response_model=JobCreated,
             responses=error_responses(401, 403, 422, 429, 503))
async def finetune(payload: FinetuneJob, request: Request, settings: SettingsDep, principal: AdminKey,
                   metrics: MetricsDep) -> JobCreated:
    """Queue a fine-tuning run of `base_version` (default: the current version) on `dataset`; every training
    field left out takes the trainer's default (lora, lr 2e-5, ...)."""
    webhook_url = await webhooks.checked(settings, payload.webhook_url)
    job = await in_session(settings, lambda s: submit_finetune(s, settings, metrics, principal, payload))
    await webhooks.attach(settings, job, webhook_url)
    return created(job, base_url(settings, str(request.base_url)))
