"""Auth, ownership, per-key limits, open mode and request bounds, on the real app with real Redis as the
broker and a real database, but no worker: submitted jobs stay queued, which is what limits are about."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.settings import get_settings
from tests.support.stack import fresh_database

JOB = {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 2}


@dataclass
class Gateway:
    client: TestClient
    admin: str
    user: str
    other: str

    def h(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def submit(self, key: str, **fields) -> object:
        return self.client.post("/generate", json={**JOB, **fields}, headers=self.h(key))


@pytest.fixture
def fresh_postgres(postgres_url: str) -> Iterator[str]:
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def make_gateway(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                 redis_url: str) -> Iterator[Callable[..., Gateway]]:
    clients: list[TestClient] = []

    def make(**env: str) -> Gateway:
        monkeypatch.setenv("ECHO4O_BROKER_URL", redis_url)
        if request.param == "postgresql":
            monkeypatch.setenv("ECHO4O_DATABASE_URL", request.getfixturevalue("fresh_postgres"))
        for k, v in env.items():
            monkeypatch.setenv(f"ECHO4O_{k.upper()}", v)
        get_settings.cache_clear()
        settings = get_settings()
        upgrade_to_head(settings.database_url)
        with session_scope(settings.database_url) as s:
            keys = [crud.create_api_key(session=s, name=n, is_admin=(n == "admin"))[1]
                    for n in ("admin", "user", "other")]
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return Gateway(client, *keys)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def assert_error(r, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param, err
    return err


def test_keys_are_required_and_checked(make_gateway) -> None:
    gw = make_gateway()
    r = gw.client.post("/generate", json=JOB)
    err = assert_error(r, 401, "missing_api_key")
    assert "echo4o keys create" in err["message"] and r.headers["www-authenticate"] == "Bearer"
    assert_error(gw.submit("e4o_wrong"), 401, "invalid_api_key")
    assert_error(gw.client.get("/jobs", headers={"Authorization": f"Basic {gw.user}"}), 401, "invalid_authorization")
    assert gw.client.get("/jobs", headers={"X-API-Key": gw.user}).status_code == 200
    assert gw.submit(gw.user).status_code == 202

    with session_scope(get_settings().database_url) as s:
        (row,) = [k for k in crud.list_api_keys(session=s) if k.name == "user"]
        assert crud.revoke_api_key(session=s, key_id=row.id)
    assert_error(gw.client.get("/jobs", headers=gw.h(gw.user)), 401, "invalid_api_key")
    # health needs no key; everything else does
    assert gw.client.get("/healthz").json() == {"status": "ok"}
    assert gw.client.get("/models").status_code == 401


def test_a_user_sees_only_its_own_jobs(make_gateway) -> None:
    gw = make_gateway()
    mine = gw.submit(gw.user).json()["id"]
    theirs = gw.submit(gw.other).json()["id"]
    assert_error(gw.client.get(f"/jobs/{theirs}", headers=gw.h(gw.user)), 404, "not_found", "job_id")
    assert_error(gw.client.delete(f"/jobs/{theirs}", headers=gw.h(gw.user)), 404, "not_found", "job_id")
    assert_error(gw.client.get(f"/jobs/{theirs}/events", headers=gw.h(gw.user)), 404, "not_found", "job_id")
    assert_error(gw.client.get(f"/jobs/{theirs}/images/0", headers=gw.h(gw.user)), 404, "not_found", "job_id")
    listed = gw.client.get("/jobs", headers=gw.h(gw.user)).json()
    assert [j["id"] for j in listed["data"]] == [mine] and listed["count"] == 1
    assert_error(gw.client.get("/jobs?all=true", headers=gw.h(gw.user)), 403, "admin_required")
    assert_error(gw.client.get("/admin/queue", headers=gw.h(gw.user)), 403, "admin_required")
    # an admin sees everyone's
    assert gw.client.get(f"/jobs/{theirs}", headers=gw.h(gw.admin)).json()["id"] == theirs
    everyone = gw.client.get("/jobs?all=true", headers=gw.h(gw.admin)).json()
    assert {j["id"] for j in everyone["data"]} == {mine, theirs}
    queue = gw.client.get("/admin/queue", headers=gw.h(gw.admin)).json()
    assert queue["queued"] == 2 and [j["queue_position"] for j in queue["data"]] == [1, 2]
    assert_error(gw.client.get("/jobs/0123456789abcdef", headers=gw.h(gw.user)), 404, "not_found", "job_id")


def test_rate_limit_answers_429_with_retry_after(make_gateway) -> None:
    gw = make_gateway(rate_limit_per_minute="3")
    for _ in range(3):
        assert gw.submit(gw.user).status_code == 202
    r = gw.submit(gw.user)
    err = assert_error(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) > 0 and "ECHO4O_RATE_LIMIT_PER_MINUTE" in err["message"]
    assert gw.submit(gw.other).status_code == 202  # limits are per key


def test_queued_job_limit_answers_429_until_a_job_ends(make_gateway) -> None:
    gw = make_gateway(max_queued_jobs_per_key="2")
    first = gw.submit(gw.user).json()["id"]
    assert gw.submit(gw.user).status_code == 202
    r = gw.submit(gw.user)
    assert_error(r, 429, "too_many_active_jobs")
    assert int(r.headers["retry-after"]) > 0
    # cancelling a queued job frees its slot at once
    cancelled = gw.client.delete(f"/jobs/{first}", headers=gw.h(gw.user)).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert gw.submit(gw.user).status_code == 202


def test_queue_positions_follow_priority_then_age(make_gateway) -> None:
    gw = make_gateway()
    a = gw.submit(gw.user).json()["id"]
    b = gw.submit(gw.user).json()["id"]
    urgent = gw.submit(gw.user, priority=9).json()["id"]
    pos = {j: gw.client.get(f"/jobs/{j}", headers=gw.h(gw.user)).json()["queue_position"] for j in (a, b, urgent)}
    assert pos == {urgent: 1, a: 2, b: 3}
    # the stream opens with the position
    with gw.client.stream("GET", f"/jobs/{b}/events", headers=gw.h(gw.user)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data:"):
                break
    assert lines[0] == "event: queued" and lines[1] == 'data: {"position": 3}'


def test_wait_and_bodies_are_bounded(make_gateway) -> None:
    gw = make_gateway(wait_max_s="5", max_upload_bytes="4096", max_references="2")
    err = assert_error(gw.client.post("/generate?wait=6", json=JOB, headers=gw.h(gw.user)), 422, "invalid_value",
                       "wait")
    assert "ECHO4O_WAIT_MAX_S" in err["message"]
    assert_error(gw.client.post("/generate?wait=-1", json=JOB, headers=gw.h(gw.user)), 422, "invalid_value", "wait")
    # ?wait on a job no worker runs: the usual 202 once the time is up
    r = gw.client.post("/generate?wait=0.3", json=JOB, headers=gw.h(gw.user))
    assert r.status_code == 202 and r.json()["status"] == "queued"
    # a body larger than every allowed image together is cut off before it is read
    big = {"prompt": "x", "images": ["A" * 20_000]}
    r = gw.client.post("/multiref", json=big, headers=gw.h(gw.user))
    assert r.status_code == 413 and "error" in r.json()


def test_open_mode_needs_no_key_and_only_binds_loopback(make_gateway, tmp_path) -> None:
    gw = make_gateway(auth="off")
    r = gw.client.post("/generate", json=JOB)
    assert r.status_code == 202
    job = gw.client.get(f"/jobs/{r.json()['id']}").json()
    assert job["status"] == "queued"
    assert gw.client.get("/admin/workers").status_code == 200  # the local demo user is its admin

    env = {"PATH": "/usr/bin:/bin", "ECHO4O_AUTH": "off", "ECHO4O_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "echo4o", "serve", "--host", "0.0.0.0", "--port", "9"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "ECHO4O_AUTH=off is only allowed on a loopback address" in proc.stderr
    assert "echo4o keys create" in proc.stderr
