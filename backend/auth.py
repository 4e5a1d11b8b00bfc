"""API keys and per-key limits.

Keys come as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; only their SHA-256 is stored
(:func:`echo4o.db.crud.verify_api_key`). With ``ECHO4O_AUTH=off`` (loopback binds only) every caller is the
``anonymous`` owner with admin rights: a local demo has one user.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.errors import ApiError
from echo4o.db import crud
from echo4o.db.models import ANONYMOUS, ApiKey, Job
from echo4o.settings import Settings

RATE_WINDOW_S = 60.0
QUEUED_LIMIT_RETRY_S = 5  # a slot frees when one of the key's jobs ends; ask again soon


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id owns the jobs it submits."""

    id: str
    name: str
    is_admin: bool

    @property
    def owner(self) -> str:
        return self.id


OPEN_MODE = Principal(id=ANONYMOUS, name="anonymous (ECHO4O_AUTH=off)", is_admin=True)


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip() or None
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Authorization header must be `Bearer <API key>`", code="invalid_authorization",
                           headers={"WWW-Authenticate": "Bearer"})
        return token.strip()
    return None


def authenticate(session: Session, settings: Settings, key: str | None) -> Principal:
    if settings.auth == "off":
        return OPEN_MODE
    if not key:
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>` "
            "(an admin makes keys with `echo4o keys create`)",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = _KEY_CACHE.get(key)  # key lookup cache: see the block below
    if principal is not None:
        return principal
    row = crud.verify_api_key(session=session, key=key)
    if row is None:
        raise ApiError(401, "unknown or revoked API key", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    principal = Principal(id=row.id, name=row.name, is_admin=row.is_admin)
    _KEY_CACHE.put(key, principal)
    return principal


# --- key lookup cache (gateway submissions) ----------------------------------------------------------------
# A key that verified is remembered for KEY_CACHE_TTL_S, keyed by its SHA-256 (the plain key is never kept), so
# a busy client costs no database query per request. Revoking or changing a key in this process (any flush that
# updates or deletes an api_keys row) empties the cache at once; a revoke from another process (`echo4o keys
# revoke`, another gateway) takes effect here within KEY_CACHE_TTL_S. Unknown keys are never cached.

KEY_CACHE_TTL_S = 5.0
KEY_CACHE_SIZE = 4096


class _KeyCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def get(self, key: str) -> Principal | None:
        digest = crud.hash_key(key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if time.monotonic() >= entry[1]:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[0]

    def put(self, key: str, principal: Principal) -> None:
        with self._lock:
            self._entries[crud.hash_key(key)] = (principal, time.monotonic() + KEY_CACHE_TTL_S)
            while len(self._entries) > KEY_CACHE_SIZE:
                self._entries.popitem(last=False)

    def clear(self, *_args: object) -> None:
        with self._lock:
            self._entries.clear()


_KEY_CACHE = _KeyCache()
forget_keys = _KEY_CACHE.clear  # after changing keys other than through the ORM


def cached_principal(settings: Settings, key: str | None) -> Principal | None:
    """Who ``key`` is when that is known without the database (auth off, or a key verified lately); None
    means: call :func:`authenticate`."""
    if settings.auth == "off":
        return OPEN_MODE
    return _KEY_CACHE.get(key) if key else None


sa.event.listen(ApiKey, "after_update", _KEY_CACHE.clear)
sa.event.listen(ApiKey, "after_delete", _KEY_CACHE.clear)
# --- end of the key lookup cache -----------------------------------------------------------------------------


def require_admin(principal: Principal) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "this needs an admin key (`echo4o keys create --admin`)", code="admin_required")
    return principal


def check_owner(principal: Principal, job: Job) -> None:
    """404 when ``job`` belongs to another key (admins see every job): the same answer as for an id that does
    not exist, so one key cannot learn which ids another key's jobs have."""
    if not principal.is_admin and job.owner != principal.owner:
        raise ApiError(404, f"job {job.id!r} does not exist", code="not_found", param="job_id")


def check_submit_limits(session: Session, settings: Settings, principal: Principal, *, new_jobs: int = 1) -> None:
    """429 with Retry-After when ``principal`` is past its per-minute rate or its queued-job limit."""
    recent = crud.count_recent_jobs(session=session, owner=principal.owner, seconds=RATE_WINDOW_S)
    active = crud.count_active_jobs(session=session, owner=principal.owner)
    error = submit_limit_error(settings, recent, active, new_jobs=new_jobs)
    if error is not None:
        raise error


def submit_limit_error(settings: Settings, recent: int, active: int, *, new_jobs: int = 1) -> ApiError | None:
    """The 429 (with Retry-After) refusing ``new_jobs`` more to a key with ``recent`` jobs in the last minute and
    ``active`` queued or running; None when they fit."""
    if recent + new_jobs > settings.rate_limit_per_minute:
        return ApiError(
            429,
            f"rate limit: {recent} jobs in the last minute, {settings.rate_limit_per_minute} allowed "
            "(ECHO4O_RATE_LIMIT_PER_MINUTE); retry after the time in Retry-After",
            code="rate_limited",
            headers={"Retry-After": str(int(RATE_WINDOW_S))},
        )
    if active + new_jobs > settings.max_queued_jobs_per_key:
        return ApiError(
            429,
            f"queued-job limit: {active} jobs queued or running, {settings.max_queued_jobs_per_key} allowed "
            "(ECHO4O_MAX_QUEUED_JOBS_PER_KEY); wait for some to finish or cancel them",
            code="too_many_active_jobs",
            headers={"Retry-After": str(QUEUED_LIMIT_RETRY_S)},
        )
    return None
