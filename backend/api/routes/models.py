"""``GET /models``: the model versions jobs can ask for."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api.deps import CurrentKey, SessionDep, SettingsDep
from backend.schemas import ModelCard, ModelList, error_responses
from echo4o import versions
from echo4o.db import crud

router = APIRouter(tags=["service"])


@router.get("/models", response_model=ModelList, responses=error_responses(401))
def list_models(session: SessionDep, settings: SettingsDep, principal: CurrentKey) -> ModelList:
    """The versions a job may name: the configured model first, then the registered ones; ``current`` marks the
    one a job that names none runs on. ``workers_ready``: the ready workers started with the configured model, and
    for a registered version every ready image worker (each loads it on demand)."""
    ready = crud.list_ready_workers(session=session)
    current = versions.current_version(session, settings)
    cards = {settings.model_version: ModelCard(id=settings.model_version, source=settings.model, workers_ready=0)}
    for row in versions.list_versions(session):
        cards.setdefault(row.ref, ModelCard(id=row.ref, source=row.path, workers_ready=0))
    for w in ready:
        if (w.model_version or settings.model_version) == settings.model_version:
            cards[settings.model_version].workers_ready += 1
        if "gpu" in w.queues.split(","):
            for ref, card in cards.items():
                if ref != settings.model_version:
                    card.workers_ready += 1
    if current in cards:  # a promoted version whose row is gone is not listed
        cards[current].current = True
    return ModelList(data=list(cards.values()))
