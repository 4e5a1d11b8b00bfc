"""The enqueue client the gateway uses (:mod:`echo4o.queue`, over :mod:`echo4o.celery_app`), on real Redis and
on a broker that does not answer. No worker: what is sent stays in its queue, where the test counts it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from echo4o import queue
from echo4o.celery_app import QUEUES, TASK_OF_QUEUE, broker_priority, get_app
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import JOB_KINDS, MAX_PRIORITY, QUEUE_OF_KIND
from echo4o.settings import get_settings


def test_every_job_kind_has_a_queue_and_every_queue_a_task() -> None:
    assert set(QUEUE_OF_KIND) == set(JOB_KINDS)
    assert set(QUEUE_OF_KIND.values()) == set(QUEUES) == set(TASK_OF_QUEUE)


def test_job_priority_maps_to_redis_order_highest_first() -> None:
    assert [broker_priority(p) for p in range(MAX_PRIORITY + 1)] == list(range(MAX_PRIORITY, -1, -1))
    assert broker_priority(-3) == MAX_PRIORITY and broker_priority(MAX_PRIORITY + 5) == 0


def test_submit_sends_each_kind_to_its_queue(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("ECHO4O_BROKER_URL", redis_url)
    get_settings.cache_clear()
    assert queue.ping_broker()["broker"] == redis_url
    for name in QUEUES:
        get_app().connection_for_write().default_channel.queue_declare(queue=name)  # count from zero
    sent = {name: 0 for name in QUEUES}
    for n, kind in enumerate(JOB_KINDS):
        assert queue.submit(f"job-{n}", kind, priority=n % (MAX_PRIORITY + 1)) == f"job-{n}"
        sent[QUEUE_OF_KIND[kind]] += 1
    assert {name: queue.queue_depth(name) for name in QUEUES} == sent
    with pytest.raises(ValueError, match="kind must be one of"):
        queue.submit("job-x", "painting")


DOWN = "redis://:secret@127.0.0.1:1/0"  # nothing listens on port 1


def test_an_unreachable_broker_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO4O_BROKER_URL", DOWN)
    get_settings.cache_clear()
    for call in (lambda: queue.submit("job-1", "generate"), queue.ping_broker):
        with pytest.raises(queue.BrokerUnavailable) as info:
            call()
        message = str(info.value)
        assert "127.0.0.1:1" in message and "ECHO4O_BROKER_URL" in message
        assert "secret" not in message  # the password is masked


def test_the_gateway_answers_503_and_fails_the_job_when_the_broker_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO4O_BROKER_URL", DOWN)
    get_settings.cache_clear()
    upgrade_to_head()
    with session_scope() as s:
        key = crud.create_api_key(session=s, name="user")[1]
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app()) as c:
        r = c.post("/generate", json={"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 2},
                   headers=headers)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "broker_unavailable" and "ECHO4O_BROKER_URL" in r.json()["error"]["message"]
        (job,) = c.get("/jobs", headers=headers).json()["data"]
        assert (job["status"], job["error"]["code"]) == ("failed", "broker_unavailable")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "ECHO4O_BROKER_URL" in ready.json()["checks"]["broker"]
