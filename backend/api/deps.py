"""Dependencies every route declares as parameters: settings, a DB session, the calling key.

Authentication errors are raised here, so a route that takes ``CurrentKey`` is protected by declaring it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from backend.auth import Principal, authenticate, cached_principal, key_from_headers, require_admin
from backend.metrics import Metrics
from backend.services.blocking import run_sync
from echo4o.db import get_sessionmaker
from echo4o.settings import Settings

# Declared as security schemes so the OpenAPI spec (and clients generated from it) know both ways in.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_x_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API key>`")


async def get_app_settings(request: Request) -> Settings:  # async: no thread hop for a lookup
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session for a sync route (used within its one thread). Async routes use
    :func:`backend.services.blocking.in_session`."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_current_key(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
    x_api_key: Annotated[str | None, Security(_x_api_key)] = None,
) -> Principal:
    # HTTPBearer returns None for a non-Bearer scheme; read the raw header so that case gets a clear 401.
    key = key_from_headers(request.headers.get("authorization"), x_api_key)
    # async, so that a key verified lately (the usual case) costs no thread hop; else the lookup runs in a thread
    principal = cached_principal(settings, key)
    if principal is None:
        principal = await run_sync(_authenticate, settings, key)
    request.state.principal = principal
    return principal


@dataclass(frozen=True, slots=True)
class Caller:
    """The app's settings and the calling key, resolved together (:func:`get_caller`)."""

    settings: Settings
    principal: Principal


async def get_caller(request: Request) -> Caller:
    """Settings and key in one dependency, for the hot submit route: the same checks and 401s as
    :func:`get_current_key` (both headers read raw, as the two security schemes would), without the four
    sub-dependencies FastAPI would resolve per request. A route using it declares the security schemes itself
    (``openapi_extra=SECURITY``)."""
    settings: Settings = request.app.state.settings
    headers = request.headers
    key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    principal = cached_principal(settings, key)
    if principal is None:
        principal = await run_sync(_authenticate, settings, key)
    request.state.principal = principal
    return Caller(settings, principal)


CallerDep = Annotated[Caller, Depends(get_caller)]
#: The OpenAPI ``security`` of a route authenticated by :func:`get_caller` (what ``CurrentKey`` declares).
SECURITY = {"security": [{"HTTPBearer": []}, {"APIKeyHeader": []}]}


def _authenticate(settings: Settings, key: str | None) -> Principal:
    # A session of its own, closed before the route runs: no pooled connection is held across the thread
    # hops of an async route (with every worker thread waiting for a connection, that would deadlock).
    session = get_sessionmaker(settings.database_url)()
    try:
        return authenticate(session, settings, key)
    finally:
        session.close()


CurrentKey = Annotated[Principal, Depends(get_current_key)]


def get_admin_key(principal: CurrentKey) -> Principal:
    return require_admin(principal)


AdminKey = Annotated[Principal, Depends(get_admin_key)]
