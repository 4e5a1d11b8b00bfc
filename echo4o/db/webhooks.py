"""Webhook records: a job's delivery row and each owner's signing secret (no HTTP types; see
backend/services/webhooks.py for the dispatcher that uses them).

A delivery row is written when a job asking for a webhook is submitted (state ``waiting``). Once its job has
ended, a gateway's dispatcher claims it with one conditional UPDATE (``attempts`` is the version: the claim
increments it and only the holder of that attempt may record its outcome), so several gateways never deliver
the same attempt twice, and a claim whose gateway died is taken over once its lease (``next_attempt_at``) passed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from echo4o.db.models import (
    TERMINAL_STATUSES,
    WEBHOOK_PENDING_STATES,
    Job,
    WebhookDelivery,
    WebhookSecret,
    utcnow,
)

SECRET_PREFIX = "whsec_"


def create_delivery(*, session: Session, job_id: str, owner: str, url: str, base_url: str = "") -> WebhookDelivery:
    """The ``waiting`` delivery of ``job_id`` to ``url``."""
    now = utcnow()
    row = WebhookDelivery(job_id=job_id, owner=owner, url=url, base_url=base_url, state="waiting", attempts=0,
                          next_attempt_at=now, created_at=now)
    session.add(row)
    session.commit()
    return row


def get_delivery(*, session: Session, job_id: str) -> WebhookDelivery | None:
    return session.get(WebhookDelivery, job_id)


@dataclass(frozen=True)
class Due:
    """A delivery that may be attempted now, as read (``state`` and ``attempts`` are what a claim checks)."""

    job_id: str
    state: str
    attempts: int


#: Job ids looked up per query when checking which pending deliveries' jobs have ended.
_LOOKUP_CHUNK = 500


def due_deliveries(*, session: Session, now: datetime | None = None, limit: int = 50) -> list[Due]:
    """Pending deliveries whose time has come and whose job has ended, oldest first.

    Two indexed reads rather than one join: the pending rows (a range of ``ix_webhook_deliveries_due``: jobs
    still running plus the few retries due), then those jobs by primary key. Joined in SQL, PostgreSQL hashes
    the whole jobs table (mostly ended jobs) on every poll."""
    now = now or utcnow()
    pending = session.execute(
        sa.select(WebhookDelivery.job_id, WebhookDelivery.state, WebhookDelivery.attempts)
        .where(WebhookDelivery.state.in_(WEBHOOK_PENDING_STATES), WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
    ).all()
    ended: set[str] = set()
    for i in range(0, len(pending), _LOOKUP_CHUNK):
        ids = [r.job_id for r in pending[i:i + _LOOKUP_CHUNK]]
        # by primary key only: with the status in the WHERE too, SQLite scans the status index instead
        rows = session.execute(sa.select(Job.id, Job.status).where(Job.id.in_(ids))).all()
        ended.update(job_id for job_id, status in rows if status in TERMINAL_STATUSES)
        if len(ended) >= limit:
            break
    due = [Due(job_id=r.job_id, state=r.state, attempts=r.attempts) for r in pending if r.job_id in ended]
    return due[:limit]


def claim(*, session: Session, due: Due, lease_s: float) -> int | None:
    """Take ``due`` for one attempt: its attempt number, or None when another gateway took it first. The row is
    ``delivering`` until ``lease_s`` from now; past that it is due again (its gateway died mid-attempt)."""
    now = utcnow()
    result = session.execute(
        sa.update(WebhookDelivery)
        .where(WebhookDelivery.job_id == due.job_id, WebhookDelivery.state == due.state,
               WebhookDelivery.attempts == due.attempts)
        .values(state="delivering", attempts=due.attempts + 1, last_attempt_at=now,
                next_attempt_at=now + timedelta(seconds=lease_s))
    )
    session.commit()
    return due.attempts + 1 if result.rowcount == 1 else None


def record_attempt(*, session: Session, job_id: str, attempt: int, status: int | None, error: str | None,
                   retry_in_s: float | None) -> bool:
    """Record attempt ``attempt``'s outcome: ``delivered`` when ``error`` is None, else ``retrying`` in
    ``retry_in_s`` seconds, or ``failed`` when ``retry_in_s`` is None. False when the attempt is no longer this
    caller's (its lease ran out and another gateway claimed the row)."""
    now = utcnow()
    values: dict[str, object] = {"last_status": status, "last_error": error}
    if error is None:
        values.update(state="delivered", delivered_at=now, last_error=None)
    elif retry_in_s is None:
        values.update(state="failed")
    else:
        values.update(state="retrying", next_attempt_at=now + timedelta(seconds=retry_in_s))
    result = session.execute(
        sa.update(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id, WebhookDelivery.state == "delivering",
               WebhookDelivery.attempts == attempt)
        .values(**values)
    )
    session.commit()
    return result.rowcount == 1


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def get_secret(*, session: Session, owner: str) -> str:
    """``owner``'s webhook secret, made on first use (two gateways making it at once agree on one)."""
    row = session.get(WebhookSecret, owner)
    if row is not None:
        return row.secret
    try:
        session.add(WebhookSecret(owner=owner, secret=_new_secret(), created_at=utcnow()))
        session.commit()
    except IntegrityError:
        session.rollback()
    session.expire_all()
    row = session.get(WebhookSecret, owner)
    assert row is not None
    return row.secret


def rotate_secret(*, session: Session, owner: str) -> str:
    """A new secret for ``owner``; deliveries from now on are signed with it."""
    secret = _new_secret()
    updated = session.execute(
        sa.update(WebhookSecret).where(WebhookSecret.owner == owner).values(secret=secret, created_at=utcnow())
    ).rowcount
    if not updated:
        session.add(WebhookSecret(owner=owner, secret=secret, created_at=utcnow()))
    session.commit()
    return secret


def secret_created_at(*, session: Session, owner: str) -> datetime | None:
    return session.scalar(sa.select(WebhookSecret.created_at).where(WebhookSecret.owner == owner))
