"""``GET /models``: the model versions jobs can ask for."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api.deps import CurrentKey, SessionDep, SettingsDep
from backend.schemas import ModelCard, ModelList, error_responses
from echo4o.db import crud

router = APIRouter(tags=["service"])


@router.get("/models", response_model=ModelList, responses=error_responses(401))
def list_models(session: SessionDep, settings: SettingsDep, principal: CurrentKey) -> ModelList:
    """The configured model first, then any other version a ready worker reports."""
    ready = crud.list_ready_workers(session=session)
    cards = {settings.model_version: ModelCard(id=settings.model_version, source=settings.model, workers_ready=0)}
    for w in ready:
        version = w.model_version or settings.model_version
        card = cards.setdefault(version, ModelCard(id=version, source=version, workers_ready=0))
        card.workers_ready += 1
    return ModelList(data=list(cards.values()))
