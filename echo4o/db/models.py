"""SQL records: jobs, API keys and workers (see docs/contracts.md, "Records").

Timestamps are timezone-aware UTC in Python on every backend (SQLite stores them as naive UTC).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from echo4o.jobs import ACTIVE_STATUSES, JOB_KINDS, JOB_STATUSES, QUEUE_OF_KIND, TERMINAL_STATUSES

__all__ = ["ACTIVE_STATUSES", "JOB_KINDS", "JOB_STATUSES", "QUEUE_OF_KIND", "TERMINAL_STATUSES", "ApiKey", "Base",
           "Job", "ModelPromotion", "ModelVersion", "WebhookDelivery", "WebhookSecret", "Worker", "new_id", "utcnow"]

#: ``dead``: its heartbeat stopped (another worker found it so and requeued its jobs, see crud.mark_dead_workers).
WORKER_STATUSES = ("loading", "ready", "busy", "stopped", "dead")
#: Statuses of a worker that runs nothing: its running jobs may be claimed by another.
GONE_WORKER_STATUSES = ("stopped", "dead")
ANONYMOUS = "anonymous"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A 32-hex-character random id."""
    return uuid.uuid4().hex


class UTCDateTime(sa.types.TypeDecorator):
    """Aware UTC datetimes in Python; naive UTC in SQLite, ``timestamptz`` in PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime (echo4o.db.models.utcnow())")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: sa.JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(sa.String(16))
    owner: Mapped[str] = mapped_column(sa.String(64), default=ANONYMOUS)
    params: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    model_version: Mapped[str] = mapped_column(sa.String(200))
    priority: Mapped[int] = mapped_column(sa.Integer, default=5)
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    progress_stage: Mapped[str | None] = mapped_column(sa.String(32))
    progress_step: Mapped[int] = mapped_column(sa.Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(sa.Integer)
    #: What a long job reports beside its step (training: loss, lr, samples_per_s, eta_s; benchmark: counts).
    progress_detail: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    preview: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    result: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(sa.String(255))
    gpu: Mapped[str | None] = mapped_column(sa.String(255))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: The job that submitted this one (a benchmark run's image jobs), if any.
    parent_id: Mapped[str | None] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        sa.Index("ix_jobs_owner_created", "owner", "created_at"),
        sa.Index("ix_jobs_status_priority_created", "status", "priority", "created_at"),
        sa.Index("ix_jobs_parent", "parent_id"),
    )

    @property
    def queue(self) -> str:
        return QUEUE_OF_KIND.get(self.kind, "gpu")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!r}, status={self.status!r}, owner={self.owner!r})"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(200))
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(8))
    is_admin: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, name={self.name!r}, prefix={self.prefix!r}, admin={self.is_admin})"


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)  # hostname:pid
    hostname: Mapped[str] = mapped_column(sa.String(255))
    queues: Mapped[str] = mapped_column(sa.String(255))  # comma-separated
    model_version: Mapped[str | None] = mapped_column(sa.String(200))
    device: Mapped[str | None] = mapped_column(sa.String(255))
    attention: Mapped[str | None] = mapped_column(sa.String(32))
    status: Mapped[str] = mapped_column(sa.String(16), default="loading")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Worker(id={self.id!r}, status={self.status!r}, model={self.model_version!r})"


class ModelVersion(Base):
    """A model version jobs may name: a checkpoint folder in the released layout and its manifest."""

    __tablename__ = "model_versions"

    #: ``<name>/<version>``, the folder under the weights dir and what jobs name as ``model_version``.
    ref: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    version: Mapped[str] = mapped_column(sa.String(100))
    path: Mapped[str] = mapped_column(sa.Text)
    manifest: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    #: base, download, finetune or import (echo4o.versions.SOURCES).
    source: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"ModelVersion(ref={self.ref!r}, source={self.source!r})"


class ModelPromotion(Base):
    """One promotion: ``ref`` became the version new jobs get. A rollback marks the latest one reverted, so the
    current version is the ref of the newest promotion not reverted (none: the configured model)."""

    __tablename__ = "model_promotions"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    ref: Mapped[str] = mapped_column(sa.String(200), sa.ForeignKey("model_versions.ref"))
    promoted_by: Mapped[str] = mapped_column(sa.String(200))
    promoted_at: Mapped[datetime] = mapped_column(default=utcnow)
    reverted_by: Mapped[str | None] = mapped_column(sa.String(200))
    reverted_at: Mapped[datetime | None]

    __table_args__ = (sa.Index("ix_model_promotions_reverted", "reverted_at", "id"),)

    def __repr__(self) -> str:
        return f"ModelPromotion(id={self.id!r}, ref={self.ref!r}, reverted={self.reverted_at is not None})"


#: States of a webhook delivery: ``waiting`` for its job to end, ``delivering`` (claimed by a gateway until
#: ``next_attempt_at``, after which another may take it over), ``retrying`` after a failed attempt,
#: ``delivered`` (a 2xx answer) or ``failed`` (attempts exhausted).
WEBHOOK_STATES = ("waiting", "delivering", "retrying", "delivered", "failed")
#: States in which a delivery is picked up once ``next_attempt_at`` has passed (and its job has ended).
WEBHOOK_PENDING_STATES = ("waiting", "delivering", "retrying")


class WebhookDelivery(Base):
    """Where to POST a job once it ends, and how far delivering it got (see backend/services/webhooks.py)."""

    __tablename__ = "webhook_deliveries"

    job_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    #: Whose webhook secret signs the deliveries (the job's owner).
    owner: Mapped[str] = mapped_column(sa.String(64))
    url: Mapped[str] = mapped_column(sa.Text)
    #: The URL prefix of links in the delivered job (the submit's own base).
    base_url: Mapped[str] = mapped_column(sa.Text)
    state: Mapped[str] = mapped_column(sa.String(16), default="waiting")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (sa.Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    def __repr__(self) -> str:
        return f"WebhookDelivery(job_id={self.job_id!r}, state={self.state!r}, attempts={self.attempts})"


class WebhookSecret(Base):
    """The secret an owner's webhook deliveries are signed with (HMAC-SHA256). Kept readable, not hashed: the
    gateway signs with it; the key's holder reads or rotates it through ``/keys/webhook-secret``."""

    __tablename__ = "webhook_secrets"

    owner: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:  # never the secret
        return f"WebhookSecret(owner={self.owner!r})"
