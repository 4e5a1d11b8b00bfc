"""``/admin/models``: the model versions, which one new jobs get, promote and rollback (admin keys only).

A version is named by its ref ``<name>/<version>`` (see :mod:`echo4o.versions`); in a path the slash stays as
it is: ``POST /admin/models/echo4o/ft-1/promote``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from backend.api.deps import AdminKey, SessionDep, SettingsDep
from backend.errors import ApiError
from backend.schemas import (
    CurrentModelPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
    PromotionPublic,
    error_responses,
)
from echo4o import versions

router = APIRouter(prefix="/admin/models", tags=["admin"])


@router.get("", response_model=ModelVersionsPublic, responses=error_responses(401, 403))
def list_model_versions(session: SessionDep, settings: SettingsDep, principal: AdminKey) -> ModelVersionsPublic:
    """The configured model, then every registered version (oldest first) with its manifest; which one is
    current; the promotion history, newest first."""
    current = versions.current_version(session, settings)
    data = [ModelVersionPublic(ref=settings.model_version, source="configured", path=settings.model,
                               manifest=_local_manifest(settings.model), created_at=None,
                               current=current == settings.model_version)]
    for row in versions.list_versions(session):
        if row.ref == settings.model_version:
            data = data[1:]  # registered under the configured name: the registered row says more
        data.append(ModelVersionPublic(ref=row.ref, source=row.source, path=row.path, manifest=row.manifest,
                                       created_at=row.created_at, current=current == row.ref))
    promotions = [PromotionPublic.model_validate(p) for p in versions.list_promotions(session)]
    return ModelVersionsPublic(current=current, configured=settings.model_version, data=data, count=len(data),
                               promotions=promotions)


@router.post("/rollback", response_model=CurrentModelPublic, responses=error_responses(401, 403, 409))
def rollback_model(session: SessionDep, settings: SettingsDep, principal: AdminKey) -> CurrentModelPublic:
    """Revert the latest promotion: new jobs get the version current before it (past the first promotion, the
    configured model). 409 when no promotion is active."""
    previous = versions.current_version(session, settings)
    try:
        current = versions.rollback(session, settings, by=principal.name)
    except versions.NothingToRollBack as exc:
        raise ApiError(409, str(exc), code="nothing_to_roll_back") from None
    return CurrentModelPublic(current=current, previous=previous)


@router.post("/{ref:path}/promote", response_model=CurrentModelPublic, responses=error_responses(401, 403, 404))
def promote_model(ref: str, session: SessionDep, settings: SettingsDep, principal: AdminKey) -> CurrentModelPublic:
    """Make the registered version ``ref`` (``<name>/<version>``) the one new jobs get; jobs already queued
    keep the version they were given. 404 when ``ref`` is not registered."""
    previous = versions.current_version(session, settings)
    try:
        versions.promote(session, ref, by=principal.name)
    except versions.UnknownVersion:
        known = ", ".join(r.ref for r in versions.list_versions(session)) or "none yet"
        raise ApiError(404, f"model version {ref!r} is not registered (registered: {known}); see GET /admin/models",
                       code="not_found", param="ref") from None
    return CurrentModelPublic(current=versions.current_version(session, settings), previous=previous)


def _local_manifest(model: str) -> dict[str, Any] | None:
    """The manifest.json of a local model folder, if it has a readable one."""
    path = Path(model).expanduser() / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
