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
    """The configured model first, then the registered versions, then any other version a ready worker reports;
    ``current`` marks the one a job that names none runs on. Every ready worker loads a registered version on
    demand, so it counts for each of them."""
    ready = crud.list_ready_workers(session=session)
    current = versions.current_version(session, settings)
    cards = {settings.model_version: ModelCard(id=settings.model_version, source=settings.model, workers_ready=0)}
    registered = [row for row in versions.list_versions(session) if row.ref not in cards]
    for row in registered:
        cards[row.ref] = ModelCard(id=row.ref, source=row.path, workers_ready=0)
    for w in ready:
        own = w.model_version or settings.model_version
        card = cards.setdefault(own, ModelCard(id=own, source=own, workers_ready=0))
        card.workers_ready += 1
        if "gpu" in w.queues.split(","):
            for row in registered:
                if row.ref != own:
                    cards[row.ref].workers_ready += 1
    if current in cards:
        cards[current].current = True
    return ModelList(data=list(cards.values()))
