"""The model-version registry: which checkpoints jobs may name, and which one new jobs get.

A version is a folder in BAGEL's released layout with a ``manifest.json`` (see model_weights/README.md),
registered under its **ref** ``"<name>/<version>"`` (the folder ``<weights_dir>/<name>/<version>/`` it usually
lives in; e.g. ``echo4o/ft-2026-12-02-1``). Jobs name a version by its ref in ``model_version``.

The **current** version (what a job that names none runs on) is the ref of the newest promotion not rolled back;
with none, the configured one: ``settings.model_version`` (derived from ``ECHO4O_MODEL``), which workers load
from ``settings.model`` and which is always accepted without being registered.

``promote(ref)`` makes a registered version current; ``rollback()`` reverts the newest active promotion, so
the one before it (or, past the first, the configured model) is current again: promote A, promote B, rollback
gives A, rollback again gives the configured model, a third rollback has nothing to roll back to.

Torch-free; every write commits (like :mod:`echo4o.db.crud`), so the gateway, the CLI and the fine-tuning
worker share one registry through the database.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from echo4o.db.models import ModelPromotion, ModelVersion, utcnow
from echo4o.settings import Settings

__all__ = [
    "SOURCES",
    "NothingToRollBack",
    "UnknownVersion",
    "VersionConflict",
    "current_promotion",
    "current_version",
    "get_version",
    "known_versions",
    "list_promotions",
    "list_versions",
    "make_ref",
    "parse_ref",
    "promote",
    "register_version",
    "resolve_path",
    "rollback",
]

#: Where a version came from: the configured base model, ``echo4o download``, a fine-tuning run, ``echo4o import``.
SOURCES = ("base", "download", "finetune", "import")

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class UnknownVersion(LookupError):
    """A ref that is not registered (and not the configured model)."""


class VersionConflict(ValueError):
    """A ref registered already, for another folder."""


class NothingToRollBack(RuntimeError):
    """``rollback()`` with no active promotion: the configured model is current already."""


def make_ref(name: str, version: str) -> str:
    """``"<name>/<version>"``; each part 1-100 characters of letters, digits, ``.``, ``_``, ``-``, starting with a
    letter or digit (a single path component), else ValueError naming the part."""
    for label, part in (("name", name), ("version", version)):
        if not isinstance(part, str) or not _PART.fullmatch(part):
            raise ValueError(
                f"{label} {part!r} is not valid: use 1-100 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
    return f"{name}/{version}"


def parse_ref(ref: str) -> tuple[str, str]:
    """``(name, version)`` of ``"<name>/<version>"``; ValueError naming the expected form otherwise."""
    name, sep, version = ref.partition("/")
    if not sep:
        raise ValueError(f"model version {ref!r} is not a ref: write it as <name>/<version>, e.g. echo4o/main")
    make_ref(name, version)
    return name, version


# --- versions -------------------------------------------------------------------------------------------------


def register_version(
    session: Session, *, name: str, version: str, path: str | Path, manifest: dict[str, Any], source: str
) -> ModelVersion:
    """Register the checkpoint folder ``path`` as version ``<name>/<version>`` with its ``manifest``.

    Registering a ref again with the same folder updates its manifest and source (idempotent: a fine-tuning run
    that resumes registers once more); with another folder it raises :class:`VersionConflict`. ``source`` is one
    of :data:`SOURCES`. The row is committed."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest must be a dict (the manifest.json contents), got {type(manifest).__name__}")
    ref = make_ref(name, version)
    folder = str(Path(path).expanduser().resolve())
    row = session.get(ModelVersion, ref, populate_existing=True)
    if row is not None:
        if row.path != folder:
            raise VersionConflict(
                f"model version {ref!r} is registered already for {row.path}, not {folder}: choose another "
                "version name"
            )
        row.manifest = manifest
        row.source = source
    else:
        row = ModelVersion(ref=ref, name=name, version=version, path=folder, manifest=manifest, source=source,
                           created_at=utcnow())
        session.add(row)
    try:
        session.commit()
    except sa.exc.IntegrityError:  # registered by another process between our read and the insert
        session.rollback()
        return register_version(session, name=name, version=version, path=path, manifest=manifest, source=source)
    return row


def list_versions(session: Session) -> list[ModelVersion]:
    """Every registered version, oldest first."""
    return list(session.scalars(sa.select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.ref)).all())


def get_version(session: Session, ref: str) -> ModelVersion | None:
    """The registered version ``ref`` (``"<name>/<version>"``), or None."""
    return session.get(ModelVersion, ref, populate_existing=True)


def known_versions(session: Session, settings: Settings) -> list[str]:
    """Every version a job may name: the configured one first, then the registered refs."""
    refs = [settings.model_version]
    refs += [r for r in session.scalars(sa.select(ModelVersion.ref).order_by(ModelVersion.created_at,
                                                                             ModelVersion.ref)) if r not in refs]
    return refs


def resolve_path(session: Session, settings: Settings, ref: str) -> str:
    """What a worker loads for ``ref``: ``settings.model`` for the configured version, else the registered
    folder; :class:`UnknownVersion` naming the known ones otherwise."""
    if ref == settings.model_version:
        return settings.model
    row = get_version(session, ref)
    if row is None:
        raise UnknownVersion(
            f"model version {ref!r} is not registered; known: {', '.join(known_versions(session, settings))}"
        )
    return row.path


# --- promotions -----------------------------------------------------------------------------------------------


def current_promotion(session: Session) -> ModelPromotion | None:
    """The newest promotion not rolled back, or None."""
    return session.scalars(
        sa.select(ModelPromotion).where(ModelPromotion.reverted_at.is_(None)).order_by(ModelPromotion.id.desc())
        .limit(1).execution_options(populate_existing=True)
    ).first()


def current_version(session: Session, settings: Settings) -> str:
    """The version new jobs get: the promoted ref, else ``settings.model_version``."""
    promotion = current_promotion(session)
    return promotion.ref if promotion is not None else settings.model_version


def promote(session: Session, ref: str, *, by: str = "admin") -> ModelPromotion:
    """Make the registered version ``ref`` current (recording ``by``, who asked); promoting the current version
    again records nothing and returns its promotion. :class:`UnknownVersion` when ``ref`` is not registered."""
    if get_version(session, ref) is None:
        raise UnknownVersion(f"model version {ref!r} is not registered: register it first (echo4o import, a "
                             "fine-tuning run) or pick one of GET /admin/models")
    active = current_promotion(session)
    if active is not None and active.ref == ref:
        return active
    row = ModelPromotion(ref=ref, promoted_by=by, promoted_at=utcnow())
    session.add(row)
    session.commit()
    return row


def rollback(session: Session, settings: Settings | None = None, *, by: str = "admin") -> str:
    """Revert the newest active promotion; returns the version current afterwards (the previous promotion's,
    else the configured one of ``settings``, default the process settings). :class:`NothingToRollBack` when no
    promotion is active. One conditional UPDATE, so two concurrent rollbacks revert two promotions, never one twice."""
    if settings is None:
        from echo4o.settings import get_settings

        settings = get_settings()
    while True:
        active = current_promotion(session)
        if active is None:
            raise NothingToRollBack(
                f"nothing to roll back to: no promotion is active, the configured model "
                f"{settings.model_version!r} is current"
            )
        res = session.execute(
            sa.update(ModelPromotion)
            .where(ModelPromotion.id == active.id, ModelPromotion.reverted_at.is_(None))
            .values(reverted_at=utcnow(), reverted_by=by)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if res.rowcount == 1:
            return current_version(session, settings)


def list_promotions(session: Session, *, limit: int = 50) -> list[ModelPromotion]:
    """Promotions newest first, rolled-back ones included (``reverted_at`` set)."""
    return list(session.scalars(
        sa.select(ModelPromotion).order_by(ModelPromotion.id.desc()).limit(limit)
        .execution_options(populate_existing=True)
    ).all())
