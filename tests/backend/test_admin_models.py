"""``/admin/models`` and the version new jobs get, on the real app with real Redis as the broker and a real
database (SQLite and PostgreSQL), but no worker: submitted jobs stay queued with the version they were given."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echo4o import versions
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.settings import get_settings
from tests.support.stack import fresh_database

JOB = {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 2}


@dataclass
class Gateway:
    client: TestClient
    admin: dict[str, str]
    user: dict[str, str]
    db: str

    def register(self, tmp_path: Path, ref: str) -> None:
        name, version = versions.parse_ref(ref)
        folder = tmp_path / name / version
        folder.mkdir(parents=True, exist_ok=True)
        with session_scope(self.db) as s:
            versions.register_version(s, name=name, version=version, path=folder,
                                      manifest={"name": name, "version": version, "final_loss": 0.5},
                                      source="finetune")

    def submit(self, **fields) -> dict:
        r = self.client.post("/generate", json={**JOB, **fields}, headers=self.user)
        assert r.status_code == 202, r.text
        with session_scope(self.db) as s:
            return {"model_version": crud.get_job(session=s, job_id=r.json()["id"]).model_version}


@pytest.fixture(params=["sqlite", "postgresql"])
def gateway(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, redis_url: str,
            tmp_path: Path) -> Iterator[Gateway]:
    monkeypatch.setenv("ECHO4O_BROKER_URL", redis_url)
    monkeypatch.setenv("ECHO4O_MODEL", str(tmp_path / "base-model"))
    with fresh_database(request.getfixturevalue("postgres_url")) if request.param == "postgresql" else \
            _nothing() as url:
        if url:
            monkeypatch.setenv("ECHO4O_DATABASE_URL", url)
        get_settings.cache_clear()
        settings = get_settings()
        upgrade_to_head(settings.database_url)
        with session_scope(settings.database_url) as s:
            admin = crud.create_api_key(session=s, name="admin", is_admin=True)[1]
            user = crud.create_api_key(session=s, name="user")[1]
        with TestClient(create_app(settings)) as client:
            yield Gateway(client, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {user}"},
                          settings.database_url)


class _nothing:  # noqa: N801 - a context manager standing in for fresh_database on SQLite
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _error(r, status: int, code: str, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    return err["message"]


def test_promote_then_jobs_get_it_rollback_returns(gateway: Gateway, tmp_path: Path) -> None:
    c = gateway.client
    assert gateway.submit()["model_version"] == "base-model"
    gateway.register(tmp_path, "echo4o/ft-1")
    gateway.register(tmp_path, "echo4o/ft-2")
    listing = c.get("/admin/models", headers=gateway.admin).json()
    assert (listing["current"], listing["configured"], listing["count"]) == ("base-model", "base-model", 3)
    assert [(v["ref"], v["source"], v["current"]) for v in listing["data"]] == [
        ("base-model", "configured", True), ("echo4o/ft-1", "finetune", False), ("echo4o/ft-2", "finetune", False)]
    assert listing["data"][1]["manifest"]["final_loss"] == 0.5 and listing["promotions"] == []

    r = c.post("/admin/models/echo4o/ft-1/promote", headers=gateway.admin)
    assert r.json() == {"current": "echo4o/ft-1", "previous": "base-model"}
    assert gateway.submit()["model_version"] == "echo4o/ft-1"
    assert gateway.submit(model_version="base-model")["model_version"] == "base-model"  # the old one still runs
    r = c.post("/admin/models/echo4o%2Fft-2/promote", headers=gateway.admin)  # an encoded slash works too
    assert r.json() == {"current": "echo4o/ft-2", "previous": "echo4o/ft-1"}
    public = c.get("/models", headers=gateway.user).json()["data"]
    assert [(m["id"], m["current"]) for m in public] == [
        ("base-model", False), ("echo4o/ft-1", False), ("echo4o/ft-2", True)]

    assert c.post("/admin/models/rollback", headers=gateway.admin).json() == {
        "current": "echo4o/ft-1", "previous": "echo4o/ft-2"}
    assert gateway.submit()["model_version"] == "echo4o/ft-1"
    assert c.post("/admin/models/rollback", headers=gateway.admin).json()["current"] == "base-model"
    message = _error(c.post("/admin/models/rollback", headers=gateway.admin), 409, "nothing_to_roll_back")
    assert "'base-model' is current" in message
    history = c.get("/admin/models", headers=gateway.admin).json()["promotions"]
    assert [(p["ref"], p["promoted_by"], p["reverted_by"]) for p in history] == [
        ("echo4o/ft-2", "admin", "admin"), ("echo4o/ft-1", "admin", "admin")]


def test_unknown_versions_are_refused(gateway: Gateway, tmp_path: Path) -> None:
    c = gateway.client
    gateway.register(tmp_path, "echo4o/ft-1")
    message = _error(c.post("/admin/models/echo4o/nope/promote", headers=gateway.admin), 404, "not_found", "ref")
    assert "'echo4o/nope' is not registered (registered: echo4o/ft-1)" in message
    r = c.post("/generate", json={**JOB, "model_version": "echo4o/nope"}, headers=gateway.user)
    assert "served: base-model, echo4o/ft-1" in _error(r, 422, "unknown_model", "model_version")
    r = c.post("/v1/images/generations", json={"prompt": "x", "model": "echo4o/nope", "size": "32x32"},
               headers=gateway.user)
    _error(r, 422, "unknown_model", "model")
    with session_scope(gateway.db) as s:
        assert crud.list_jobs(session=s)[1] == 0


def test_admin_key_only(gateway: Gateway, tmp_path: Path) -> None:
    gateway.register(tmp_path, "echo4o/ft-1")
    c = gateway.client
    for method, path in (("get", "/admin/models"), ("post", "/admin/models/echo4o/ft-1/promote"),
                         ("post", "/admin/models/rollback")):
        _error(getattr(c, method)(path, headers=gateway.user), 403, "admin_required")
        assert getattr(c, method)(path).status_code == 401
    with session_scope(gateway.db) as s:
        assert versions.current_version(s, get_settings()) == "base-model"


def test_models_lists_what_jobs_may_name(gateway: Gateway, tmp_path: Path) -> None:
    gateway.register(tmp_path, "echo4o/ft-1")
    with session_scope(gateway.db) as s:  # two ready image workers: one started with another model
        crud.upsert_worker(session=s, worker_id="h:1", hostname="h", queues=["gpu"], status="ready",
                           model_version="base-model")
        crud.upsert_worker(session=s, worker_id="h:2", hostname="h", queues=["gpu"], status="ready",
                           model_version="other-model")
    models = gateway.client.get("/models", headers=gateway.user).json()["data"]
    assert [(m["id"], m["workers_ready"], m["current"]) for m in models] == [
        ("base-model", 1, True), ("echo4o/ft-1", 2, False)]
    r = gateway.client.post("/generate", json={**JOB, "model_version": "other-model"}, headers=gateway.user)
    assert "served: base-model, echo4o/ft-1" in _error(r, 422, "unknown_model", "model_version")
