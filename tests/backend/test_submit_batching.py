"""Group commit of submissions (:mod:`backend.services.jobs`): every 202 still means the row is committed and its
message is at the broker, exactly once, however the submissions were batched; a batch's failures answer each of
its requests (503 naming the database or the broker, 422/429 for the one at fault), never a 500.

No worker anywhere: what is sent stays in Redis, where the tests read it back message by message."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.auth import Principal
from backend.errors import ApiError
from backend.metrics import Metrics
from backend.services.jobs import Submission, write_submissions
from echo4o import queue
from echo4o.celery_app import PRIORITY_LEVELS, QUEUES
from echo4o.db import crud, dispose_engines, session_scope, upgrade_to_head
from echo4o.db.models import Job, new_id
from echo4o.jobs import GenerateJob
from echo4o.settings import get_settings
from tests.support.stack import _base_env, free_port, fresh_database

JOB = {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 2}
START_S = 90.0


def queued_messages(broker_url: str) -> Counter[str]:
    """How many messages name each task id, over every queue and priority level."""
    client = redis.Redis.from_url(broker_url)
    ids: Counter[str] = Counter()
    for q in QUEUES:
        for level in range(PRIORITY_LEVELS):
            for raw in client.lrange(q if level == 0 else f"{q}:{level}", 0, -1):
                ids[json.loads(raw)["headers"]["id"]] += 1
    client.close()
    return ids


@contextlib.contextmanager
def live_gateway(data_dir: Path, database_url: str, broker_url: str) -> Iterator[tuple[str, str]]:
    """``echo4o serve`` as a subprocess with no worker; yields (url, a user key)."""
    upgrade_to_head(database_url)
    with session_scope(database_url) as s:
        key = crud.create_api_key(session=s, name="batching")[1]
    port = free_port()
    env = _base_env({
        "ECHO4O_DATA_DIR": str(data_dir), "ECHO4O_DATABASE_URL": database_url, "ECHO4O_BROKER_URL": broker_url,
        "ECHO4O_MODEL": str(data_dir / "model"), "ECHO4O_HOST": "127.0.0.1", "ECHO4O_PORT": str(port),
        "ECHO4O_RATE_LIMIT_PER_MINUTE": "100000", "ECHO4O_MAX_QUEUED_JOBS_PER_KEY": "100000",
        "ECHO4O_LOG_LEVEL": "WARNING",
    })
    log = data_dir / "gateway.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "echo4o", "serve"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, cwd=str(data_dir), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, f"gateway exited:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"gateway not up after {START_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'echo4o.db'}"
        return
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def test_concurrent_submits_are_each_recorded_and_queued_exactly_once(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    n, threads = 200, 16
    with live_gateway(tmp_path, database_url, redis_url) as (url, key):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          limits=httpx.Limits(max_connections=threads)) as client:
            def submit(i: int) -> httpx.Response:
                return client.post("/generate", json={**JOB, "seed": i, "priority": i % 10})

            with ThreadPoolExecutor(threads) as pool:
                answers = list(pool.map(submit, range(n)))
            assert [r.status_code for r in answers] == [202] * n, [r.text for r in answers if r.status_code != 202]
            ids = [r.json()["id"] for r in answers]
            assert len(set(ids)) == n
            metrics = client.get("/metrics").text
    assert 'echo4o_jobs_submitted_total{kind="generate"} 200.0' in metrics

    with session_scope(database_url) as s:
        rows = {j.id: j for j in s.scalars(sa.select(Job))}
    assert set(rows) == set(ids)
    assert {(j.status, j.kind) for j in rows.values()} == {("queued", "generate")}
    assert sorted(j.params["seed"] for j in rows.values()) == list(range(n))
    assert queued_messages(redis_url) == Counter(dict.fromkeys(ids, 1))  # each job's message, exactly once
    dispose_engines()


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str):  # noqa: ANN202 - Settings
    for name, value in env.items():
        monkeypatch.setenv(f"ECHO4O_{name.upper()}", value)
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_to_head(settings.database_url)
    return settings


def _submissions(owner: str, n: int, **fields: object) -> list[Submission]:
    principal = Principal(id=owner, name=owner, is_admin=False)
    payload = GenerateJob.model_validate({**JOB, **fields})
    return [Submission(principal, payload, new_id()) for _ in range(n)]


def test_a_batch_answers_each_submission_on_its_own(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    settings = _settings(monkeypatch, broker_url=redis_url, max_queued_jobs_per_key="3")
    metrics = Metrics(settings.database_url)
    owner = f"owner-{new_id()[:8]}"
    subs = _submissions(owner, 2) + _submissions(owner, 1, model_version="nobody/v9") + _submissions(owner, 3)
    outcomes = write_submissions(settings, metrics, subs)

    kinds = [type(o).__name__ if isinstance(o, Job) else (o.status, o.code, o.param) for o in outcomes]
    assert kinds == ["Job", "Job", (422, "unknown_model", "model_version"), "Job",
                     (429, "too_many_active_jobs", None), (429, "too_many_active_jobs", None)]
    queued = [o.id for o in outcomes if isinstance(o, Job)]
    with session_scope(settings.database_url) as s:
        assert sorted(j.id for j in s.scalars(sa.select(Job).where(Job.owner == owner))) == sorted(queued)
        # a slot freed by a cancel is seen at once: a refusal always re-reads the records first
        crud.request_cancel(session=s, job_id=queued[0])
    (again,) = write_submissions(settings, metrics, _submissions(owner, 1))
    assert isinstance(again, Job)
    assert queued_messages(redis_url) == Counter(dict.fromkeys([*queued, again.id], 1))


def test_a_database_failure_answers_503_to_the_whole_batch_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    settings = _settings(monkeypatch, broker_url=redis_url)
    with session_scope(settings.database_url) as s:
        key = crud.create_api_key(session=s, name="user")[1]
    headers = {"Authorization": f"Bearer {key}"}
    engine = sa.create_engine(settings.database_url)
    with TestClient(create_app()) as c:
        assert c.post("/generate", json=JOB, headers=headers).status_code == 202
        with engine.begin() as conn:  # the job table is gone: every insert fails
            conn.execute(sa.text("ALTER TABLE jobs RENAME TO jobs_away"))
        try:
            outcomes = write_submissions(settings, Metrics(settings.database_url), _submissions("someone", 5))
            assert [(o.status, o.code) for o in outcomes] == [(503, "database_unavailable")] * 5
            r = c.post("/generate", json=JOB, headers=headers)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "database_unavailable" and "ECHO4O_DATABASE_URL" in err["message"]
            assert r.headers["retry-after"] == "1"
        finally:
            with engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE jobs_away RENAME TO jobs"))
        assert c.post("/generate", json=JOB, headers=headers).status_code == 202
    engine.dispose()
    with session_scope(settings.database_url) as s:
        ids = [j.id for j in s.scalars(sa.select(Job))]
    assert len(ids) == 2 and queued_messages(redis_url) == Counter(dict.fromkeys(ids, 1))


DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_a_broker_outage_fails_every_row_of_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, broker_url=DOWN)
    outcomes = write_submissions(settings, Metrics(settings.database_url), _submissions("someone", 4))
    assert all(isinstance(o, ApiError) and (o.status, o.code) == (503, "broker_unavailable") for o in outcomes)
    with session_scope(settings.database_url) as s:
        rows = list(s.scalars(sa.select(Job)))
    assert len(rows) == 4 and {(j.status, j.error_code) for j in rows} == {("failed", "broker_unavailable")}


def test_a_batch_publish_sends_what_send_task_sends(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """The batch path builds each message itself: it must be the message Celery's send_task makes."""
    from echo4o.celery_app import TASK_IMAGE, broker_priority, get_app

    _settings(monkeypatch, broker_url=redis_url)
    get_app().send_task(TASK_IMAGE, args=["a" * 32], task_id="a" * 32, queue="gpu", routing_key="gpu",
                        priority=broker_priority(3), ignore_result=True)
    queue.submit_many([("b" * 32, "generate", 3)])
    client = redis.Redis.from_url(redis_url)
    level = broker_priority(3)
    raw = client.lrange("gpu" if level == 0 else f"gpu:{level}", 0, -1)
    client.close()
    by_id = {}
    for item in raw:
        message = json.loads(item)
        message["body"] = json.loads(base64.b64decode(message["body"]))
        message["properties"].pop("delivery_tag")
        by_id[message["headers"]["id"]] = json.loads(json.dumps(message).replace("b" * 32, "a" * 32))
    assert set(by_id) == {"a" * 32, "b" * 32}
    assert by_id["b" * 32] == by_id["a" * 32]
