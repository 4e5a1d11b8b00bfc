"""The model-version registry (echo4o.versions) on SQLite and PostgreSQL: register, promote, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from echo4o import versions
from echo4o.db import session_scope
from echo4o.settings import Settings


def _settings() -> Settings:
    return Settings(model="/models/base-model")


def _register(s, tmp_path: Path, name: str, version: str, source: str = "finetune"):
    folder = tmp_path / name / version
    folder.mkdir(parents=True, exist_ok=True)
    return versions.register_version(s, name=name, version=version, path=folder,
                                     manifest={"name": name, "version": version, "steps": 3}, source=source)


def test_register_list_get(db_url: str, tmp_path: Path) -> None:
    settings = _settings()
    with session_scope(db_url) as s:
        row = _register(s, tmp_path, "echo4o", "ft-1")
        assert (row.ref, row.name, row.version, row.source) == ("echo4o/ft-1", "echo4o", "ft-1", "finetune")
        assert row.path == str((tmp_path / "echo4o" / "ft-1").resolve())
        _register(s, tmp_path, "echo4o", "ft-2", source="import")
    with session_scope(db_url) as s:
        assert [v.ref for v in versions.list_versions(s)] == ["echo4o/ft-1", "echo4o/ft-2"]
        got = versions.get_version(s, "echo4o/ft-2")
        assert got is not None and got.manifest == {"name": "echo4o", "version": "ft-2", "steps": 3}
        assert versions.get_version(s, "echo4o/nope") is None
        assert versions.known_versions(s, settings) == ["base-model", "echo4o/ft-1", "echo4o/ft-2"]
        assert versions.resolve_path(s, settings, "base-model") == "/models/base-model"
        assert versions.resolve_path(s, settings, "echo4o/ft-1") == str((tmp_path / "echo4o" / "ft-1").resolve())
        with pytest.raises(versions.UnknownVersion, match="'echo4o/nope' is not registered; known: base-model"):
            versions.resolve_path(s, settings, "echo4o/nope")


def test_register_again_same_folder_updates_other_folder_conflicts(db_url: str, tmp_path: Path) -> None:
    with session_scope(db_url) as s:
        _register(s, tmp_path, "echo4o", "ft-1")
        again = versions.register_version(s, name="echo4o", version="ft-1", path=tmp_path / "echo4o" / "ft-1",
                                          manifest={"steps": 9}, source="finetune")
        assert again.manifest == {"steps": 9}
        with pytest.raises(versions.VersionConflict, match="registered already for .*choose another version"):
            versions.register_version(s, name="echo4o", version="ft-1", path=tmp_path / "elsewhere",
                                      manifest={}, source="import")
    with session_scope(db_url) as s:
        assert len(versions.list_versions(s)) == 1


@pytest.mark.parametrize(("name", "version", "message"), [
    ("echo4o", "a/b", "version 'a/b' is not valid"),
    ("", "v1", "name '' is not valid"),
    ("..", "v1", "name '..' is not valid"),
    ("echo4o", "-x", "version '-x' is not valid"),
])
def test_bad_names_are_refused(db_url: str, tmp_path: Path, name: str, version: str, message: str) -> None:
    with session_scope(db_url) as s, pytest.raises(ValueError, match=message):
        versions.register_version(s, name=name, version=version, path=tmp_path, manifest={}, source="import")


def test_bad_source_is_refused(db_url: str, tmp_path: Path) -> None:
    with session_scope(db_url) as s, pytest.raises(ValueError, match="source must be one of base, download"):
        versions.register_version(s, name="a", version="b", path=tmp_path, manifest={}, source="hub")


def test_promote_and_rollback_walk_back_through_history(db_url: str, tmp_path: Path) -> None:
    settings = _settings()
    with session_scope(db_url) as s:
        _register(s, tmp_path, "echo4o", "a")
        _register(s, tmp_path, "echo4o", "b")
        _register(s, tmp_path, "echo4o", "c")
        assert versions.current_version(s, settings) == "base-model"
        versions.promote(s, "echo4o/a", by="alice")
        versions.promote(s, "echo4o/b", by="bob")
        again = versions.promote(s, "echo4o/b", by="bob")  # already current: no new record
        assert versions.current_version(s, settings) == "echo4o/b"
        assert versions.rollback(s, settings, by="carol") == "echo4o/a"
        versions.promote(s, "echo4o/c", by="dave")
        assert versions.current_version(s, settings) == "echo4o/c"
        assert versions.rollback(s, settings) == "echo4o/a"
        assert versions.rollback(s, settings) == "base-model"
        with pytest.raises(versions.NothingToRollBack, match="nothing to roll back to.*'base-model' is current"):
            versions.rollback(s, settings)
        history = versions.list_promotions(s)
    assert [(p.ref, p.promoted_by, p.reverted_by is not None) for p in history] == [
        ("echo4o/c", "dave", True), ("echo4o/b", "bob", True), ("echo4o/a", "alice", True)]
    assert history[1].reverted_by == "carol" and history[1].id == again.id
    assert all(p.promoted_at.tzinfo is not None for p in history)


def test_promote_unknown_is_refused(db_url: str) -> None:
    with session_scope(db_url) as s:
        with pytest.raises(versions.UnknownVersion, match="'echo4o/x' is not registered"):
            versions.promote(s, "echo4o/x")
        assert versions.current_version(s, _settings()) == "base-model"


def test_parse_ref() -> None:
    assert versions.parse_ref("echo4o/ft-1") == ("echo4o", "ft-1")
    with pytest.raises(ValueError, match="write it as <name>/<version>"):
        versions.parse_ref("echo4o")
    with pytest.raises(ValueError, match="version 'a/b' is not valid"):
        versions.parse_ref("echo4o/a/b")
