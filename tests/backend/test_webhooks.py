"""Webhooks on the real gateway (in-process app, real Redis broker, real SQLite / PostgreSQL) and a real HTTP
receiver (http.server on 127.0.0.1 in a thread): a job's end is POSTed once, signed with its key's secret;
failed attempts are retried with backoff and recorded on the job; rows survive a gateway restart and two
gateways deliver each job once; non-public addresses are refused at submit and again at delivery. The jobs end
through the same record functions a worker calls (no worker runs here); a last test runs a real worker."""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from backend.services import webhooks
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.db import webhooks as records
from echo4o.settings import get_settings
from tests.support.stack import fresh_database

JOB = {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 2}
DEADLINE_S = 60.0


@dataclass
class Receiver:
    """A webhook receiver: answers ``statuses`` in order (then 200) and keeps every request."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, n: int, timeout_s: float = DEADLINE_S) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < n:
            assert time.monotonic() < deadline, f"{len(self.requests)} deliveries after {timeout_s} s, {n} expected"
            time.sleep(0.02)
        return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@dataclass
class Gateway:
    client: TestClient
    user: str
    other: str
    database_url: str

    def h(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.user}"}

    def submit(self, key: str | None = None, **fields: Any) -> Any:
        return self.client.post("/generate", json={**JOB, **fields}, headers=self.h(key))

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/jobs/{job_id}", headers=self.h())
        assert r.status_code == 200, r.text
        return r.json()

    def wait_webhook(self, job_id: str, states: tuple[str, ...], timeout_s: float = DEADLINE_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["webhook"]["state"] in states:
                return job
            assert time.monotonic() < deadline, f"webhook still {job['webhook']} after {timeout_s} s"
            time.sleep(0.02)


@pytest.fixture
def make_gateway(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                 redis_url: str) -> Iterator[Callable[..., Gateway]]:
    """``make(postgres=False, **settings)``: a running in-process gateway (lifespan entered, so its dispatcher
    runs) with two user keys; a second call with ``database_url`` shares the first one's database."""
    clients: list[TestClient] = []

    def make(postgres: bool = False, database_url: str | None = None, keys: tuple[str, str] | None = None,
             **env: str) -> Gateway:
        monkeypatch.setenv("ECHO4O_BROKER_URL", redis_url)
        monkeypatch.setenv("ECHO4O_WEBHOOK_ALLOW_PRIVATE", "true")
        monkeypatch.setenv("ECHO4O_WEBHOOK_POLL_S", "0.05")
        monkeypatch.setenv("ECHO4O_WEBHOOK_RETRY_BASE_S", "0.05")
        monkeypatch.setenv("ECHO4O_PUBLIC_URL", "http://gateway.test")  # links in deliveries are absolute
        if database_url is None and postgres:
            database_url = request_postgres()
        if database_url:
            monkeypatch.setenv("ECHO4O_DATABASE_URL", database_url)
        for k, v in env.items():
            monkeypatch.setenv(f"ECHO4O_{k.upper()}", v)
        get_settings.cache_clear()
        settings = get_settings()
        upgrade_to_head(settings.database_url)
        if keys is None:
            with session_scope(settings.database_url) as s:
                keys = (crud.create_api_key(session=s, name="user")[1], crud.create_api_key(session=s, name="other")[1])
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return Gateway(client, keys[0], keys[1], settings.database_url)

    stack = []

    def request_postgres() -> str:
        cm = fresh_database(request.getfixturevalue("postgres_url"))
        stack.append(cm)
        return cm.__enter__()

    yield make
    for c in clients:
        with _suppress():
            c.__exit__(None, None, None)
    for cm in stack:
        cm.__exit__(None, None, None)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True  # a client closed already by its test


def _end_job(database_url: str, job_id: str, how: str) -> None:
    """End a queued job as a worker (or a cancel) would, through the record functions they call."""
    with session_scope(database_url) as s:
        if how == "cancelled":
            crud.request_cancel(session=s, job_id=job_id)
            return
        assert crud.mark_running(session=s, job_id=job_id, worker="test-worker", gpu=None)
        if how == "succeeded":
            assert crud.mark_succeeded(session=s, job_id=job_id, result={"images": ["a.png"], "seed": 7})
        else:
            assert crud.mark_failed(session=s, job_id=job_id, code="worker_error", message="boom")


def _secret(gw: Gateway, key: str | None = None) -> str:
    r = gw.client.get("/keys/webhook-secret", headers=gw.h(key))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()["secret"]


def _check_signed(headers: dict[str, str], body: bytes, secret: str) -> None:
    ts, sig = headers["x-echo4o-timestamp"], headers["x-echo4o-signature"]
    assert sig.startswith("sha256=") and webhooks.verify(secret, ts, body, sig), headers
    assert abs(time.time() - int(ts)) < 120
    assert headers["content-type"] == "application/json"


def _queued_job_ids(database_url: str) -> set[str]:
    with session_scope(database_url) as s:
        return {job.id for job in crud.list_jobs(session=s, status="queued", limit=1000)[0]}


def test_a_wait_answer_shows_the_webhook_its_submit_asked_for(make_gateway, receiver: Receiver) -> None:
    """``POST /generate?wait=`` answers with the ended job: its webhook's delivery when the submit asked for one
    (read for the answer), none when it did not (the answer reads nothing then)."""
    gw = make_gateway()
    for url in (receiver.url, None):
        before = _queued_job_ids(gw.database_url)
        body = {**JOB, **({"webhook_url": url} if url else {})}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(gw.client.post, "/generate", params={"wait": DEADLINE_S}, json=body, headers=gw.h())
            deadline = time.monotonic() + DEADLINE_S
            while not (new := _queued_job_ids(gw.database_url) - before):
                assert time.monotonic() < deadline and not answer.done(), "the job was not recorded"
                time.sleep(0.02)
            (job_id,) = new
            _end_job(gw.database_url, job_id, "succeeded")
            r = answer.result(timeout=DEADLINE_S)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["id"] == job_id and job["status"] == "succeeded"
        if url is None:
            assert job["webhook"] is None
        else:
            assert job["webhook"]["url"] == url and job["webhook"]["state"] in ("waiting", "delivering", "delivered")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_job_end_is_posted_signed_and_recorded(make_gateway, receiver: Receiver, backend: str) -> None:
    gw = make_gateway(postgres=backend == "postgresql")
    jobs = {}
    for how in ("succeeded", "failed", "cancelled"):
        r = gw.submit(webhook_url=receiver.url)
        assert r.status_code == 202, r.text
        jobs[how] = r.json()["id"]
        job = gw.job(jobs[how])
        assert job["webhook"] == {"url": receiver.url, "state": "waiting", "attempts": 0, "last_status": None,
                                  "last_error": None, "delivered_at": None}
        assert "webhook_url" not in job["params"]  # not a generation parameter
    plain = gw.submit().json()["id"]
    assert gw.job(plain)["webhook"] is None
    assert receiver.requests == []  # nothing is delivered before a job ends

    secret = _secret(gw)
    for how, job_id in jobs.items():
        _end_job(gw.database_url, job_id, how)
        job = gw.wait_webhook(job_id, ("delivered",))
        assert job["webhook"]["attempts"] == 1 and job["webhook"]["last_status"] == 200
        headers, body = receiver.requests[-1]
        _check_signed(headers, body, secret)
        assert headers["x-echo4o-webhook-id"] == job_id and headers["x-echo4o-webhook-attempt"] == "1"
        sent = json.loads(body)
        # the body is GET /jobs/{id} as it was during the attempt
        assert sent["webhook"]["state"] == "delivering" and sent["webhook"]["attempts"] == 1
        assert {k: v for k, v in sent.items() if k != "webhook"} == {k: v for k, v in job.items() if k != "webhook"}
        assert sent["status"] == how
    assert len(receiver.requests) == 3
    image = json.loads(receiver.requests[0][1])["result"]["images"][0]
    assert image["url"] == f"http://gateway.test/jobs/{jobs['succeeded']}/images/0"
    assert json.loads(receiver.requests[1][1])["error"] == {"code": "worker_error", "message": "boom"}


def test_multiref_takes_webhook_url_as_a_form_field(make_gateway, receiver: Receiver) -> None:
    gw = make_gateway()
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    r = gw.client.post("/multiref", headers=gw.h(), data={"prompt": "make it blue", "num_steps": "2",
                                                          "webhook_url": receiver.url},
                       files=[("images", ("a.png", png.getvalue(), "image/png"))])
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert gw.client.delete(f"/jobs/{job_id}", headers=gw.h()).status_code == 200
    gw.wait_webhook(job_id, ("delivered",))
    headers, body = receiver.wait(1)[0]
    _check_signed(headers, body, _secret(gw))
    assert json.loads(body)["kind"] == "multiref" and json.loads(body)["status"] == "cancelled"


def test_failed_attempts_are_retried_with_backoff_then_given_up(make_gateway, receiver: Receiver) -> None:
    gw = make_gateway(webhook_max_attempts="3")
    receiver.statuses = [500, 503]  # then 200
    job_id = gw.submit(webhook_url=receiver.url).json()["id"]
    _end_job(gw.database_url, job_id, "failed")
    job = gw.wait_webhook(job_id, ("delivered", "failed"))
    assert job["webhook"]["state"] == "delivered" and job["webhook"]["attempts"] == 3
    got = receiver.wait(3)
    assert [h["x-echo4o-webhook-attempt"] for h, _ in got] == ["1", "2", "3"]
    assert {h["x-echo4o-webhook-id"] for h, _ in got} == {job_id}

    receiver.statuses = [500] * 10
    job_id = gw.submit(webhook_url=receiver.url).json()["id"]
    _end_job(gw.database_url, job_id, "cancelled")
    job = gw.wait_webhook(job_id, ("delivered", "failed"))
    assert job["webhook"]["state"] == "failed" and job["webhook"]["attempts"] == 3
    assert job["webhook"]["last_status"] == 500 and job["webhook"]["last_error"] == "HTTP 500"
    assert len(receiver.wait(6)) == 6

    # nobody listening: the error says so
    receiver.close()
    job_id = gw.submit(webhook_url=receiver.url).json()["id"]
    _end_job(gw.database_url, job_id, "cancelled")
    job = gw.wait_webhook(job_id, ("failed",))
    assert job["webhook"]["last_status"] is None and "Connect" in job["webhook"]["last_error"]


def test_backoff_schedule() -> None:
    settings = get_settings().model_copy(update={"webhook_retry_base_s": 10.0, "webhook_retry_max_s": 60.0,
                                                 "webhook_max_attempts": 5})
    assert [webhooks.retry_delay(settings, n) for n in range(1, 6)] == [10.0, 20.0, 40.0, 60.0, None]


def test_deliveries_survive_a_restart_and_two_gateways_send_each_once(make_gateway, receiver: Receiver) -> None:
    first = make_gateway()
    pending = first.submit(webhook_url=receiver.url).json()["id"]
    first.client.__exit__(None, None, None)  # the gateway stops; the job ends while none runs
    _end_job(first.database_url, pending, "succeeded")
    assert receiver.requests == []

    keys = (first.user, first.other)
    a = make_gateway(database_url=first.database_url, keys=keys)
    b = make_gateway(database_url=first.database_url, keys=keys)
    a.wait_webhook(pending, ("delivered",))
    ids = [a.submit(webhook_url=receiver.url).json()["id"] for _ in range(6)]
    for job_id in ids:
        _end_job(a.database_url, job_id, "cancelled")
    for job_id in ids:
        b.wait_webhook(job_id, ("delivered",))
    got = receiver.wait(7)
    assert sorted(h["x-echo4o-webhook-id"] for h, _ in got) == sorted([pending, *ids])  # each once
    assert {h["x-echo4o-webhook-attempt"] for h, _ in got} == {"1"}


def test_a_claim_is_taken_once_and_an_abandoned_one_is_taken_over(make_gateway) -> None:
    gw = make_gateway()
    job_id = gw.submit(webhook_url="http://127.0.0.1:9/never").json()["id"]
    gw.client.__exit__(None, None, None)  # no dispatcher: this test drives the records by hand
    _end_job(gw.database_url, job_id, "cancelled")
    with session_scope(gw.database_url) as s:
        (due,) = records.due_deliveries(session=s)
        assert records.claim(session=s, due=due, lease_s=0.0) == 1
        assert records.claim(session=s, due=due, lease_s=0.0) is None  # the same read cannot claim twice
        (again,) = records.due_deliveries(session=s)  # lease 0: its gateway is presumed dead
        assert again.state == "delivering" and again.attempts == 1
        assert records.claim(session=s, due=again, lease_s=60.0) == 2
        # the first attempt's outcome arrives late: it no longer owns the row
        assert not records.record_attempt(session=s, job_id=job_id, attempt=1, status=200, error=None,
                                          retry_in_s=None)
        assert records.record_attempt(session=s, job_id=job_id, attempt=2, status=200, error=None, retry_in_s=None)
        assert records.get_delivery(session=s, job_id=job_id).state == "delivered"
        assert records.due_deliveries(session=s) == []


REFUSED = ["http://127.0.0.1/hook", "http://localhost:8080/", "http://10.1.2.3/", "http://192.168.0.10/",
           "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
           "http://100.64.0.1/", "http://[fe80::1]/", "http://224.0.0.1/"]
MALFORMED = ["ftp://example.com/x", "example.com/hook", "http://user:pw@example.com/", "http://example.com:99999/",
             "http://no-such-host.invalid/hook", "http://exa mple.com/"]


def test_non_public_and_malformed_urls_are_refused_at_submit(make_gateway) -> None:
    gw = make_gateway(webhook_allow_private="false")
    for url in REFUSED:
        r = gw.submit(webhook_url=url)
        assert r.status_code == 422, (url, r.text)
        err = r.json()["error"]
        assert err["param"] == "webhook_url" and err["code"] == "webhook_url_refused", (url, err)
        assert "ECHO4O_WEBHOOK_ALLOW_PRIVATE" in err["message"]
    for url in MALFORMED:
        r = gw.submit(webhook_url=url)
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["param"] == "webhook_url", (url, r.json())
    assert gw.client.get("/jobs", headers=gw.h()).json()["count"] == 0  # no job was made
    assert [webhooks.is_public(a) for a in ("8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8")] == [True] * 3


def test_the_address_is_checked_again_at_delivery(make_gateway, receiver: Receiver) -> None:
    gw = make_gateway(webhook_max_attempts="2")
    job_id = gw.submit(webhook_url=receiver.url).json()["id"]
    gw.client.app.state.settings.webhook_allow_private = False  # as if the name now resolved to a private address
    _end_job(gw.database_url, job_id, "cancelled")
    job = gw.wait_webhook(job_id, ("failed",))
    assert job["webhook"]["attempts"] == 2 and job["webhook"]["last_status"] is None
    assert job["webhook"]["last_error"].startswith("refused: host '127.0.0.1' resolves to 127.0.0.1")
    assert receiver.requests == []


def test_webhook_secret_per_key_rotates_and_signs_later_deliveries(make_gateway, receiver: Receiver) -> None:
    gw = make_gateway()
    mine, theirs = _secret(gw), _secret(gw, gw.other)
    assert mine.startswith("whsec_") and mine != theirs and _secret(gw) == mine
    r = gw.client.post("/keys/webhook-secret", headers=gw.h())
    assert r.status_code == 200 and r.json()["secret"] not in (mine, theirs)
    rotated = r.json()["secret"]
    assert _secret(gw) == rotated and _secret(gw, gw.other) == theirs
    assert gw.client.get("/keys/webhook-secret").status_code == 401

    job_id = gw.submit(webhook_url=receiver.url).json()["id"]
    _end_job(gw.database_url, job_id, "cancelled")
    headers, body = receiver.wait(1)[0]
    _check_signed(headers, body, rotated)
    assert not webhooks.verify(mine, headers["x-echo4o-timestamp"], body, headers["x-echo4o-signature"])


def test_verify_refuses_tampering_and_old_timestamps() -> None:
    body, secret, now = b'{"id":"x"}', "whsec_test", 1_800_000_000
    ts = str(now)
    sig = webhooks.signature(secret, ts, body)
    assert webhooks.verify(secret, ts, body, sig, now=now + 299)
    assert not webhooks.verify(secret, ts, body, sig, now=now + 301)  # replayed later
    assert not webhooks.verify(secret, ts, body + b" ", sig, now=now)
    assert not webhooks.verify(secret, str(now + 1), body, sig, now=now)
    assert not webhooks.verify("whsec_other", ts, body, sig, now=now)
    assert not webhooks.verify(secret, "not-a-number", body, sig, now=now)


def test_admin_finetune_and_benchmark_runs_take_a_webhook(make_gateway, receiver: Receiver) -> None:
    from worker.training.data import TEXT_TO_IMAGE, write_test_dataset

    gw = make_gateway()
    with session_scope(gw.database_url) as s:
        admin = crud.create_api_key(session=s, name="admin", is_admin=True)[1]
    dataset = write_test_dataset(get_settings().data_dir / "datasets" / "t2i", TEXT_TO_IMAGE, num_rows=2)
    submits = {"finetune": ("/admin/finetune", {"dataset": str(dataset), "steps": 2}),
               "benchmark": ("/admin/benchmarks", {"suite": "geneval", "limit": 1})}
    gw.client.app.state.settings.webhook_allow_private = False
    for kind, (path, body) in submits.items():
        r = gw.client.post(path, json={**body, "webhook_url": "http://10.0.0.1/hook"}, headers=gw.h(admin))
        assert r.status_code == 422 and r.json()["error"]["param"] == "webhook_url", r.text
        gw.client.app.state.settings.webhook_allow_private = True
        r = gw.client.post(path, json={**body, "webhook_url": receiver.url}, headers=gw.h(admin))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert "webhook_url" not in gw.client.get(f"/jobs/{job_id}", headers=gw.h(admin)).json()["params"]
        assert gw.client.delete(f"/jobs/{job_id}", headers=gw.h(admin)).status_code == 200
        headers, sent = receiver.wait(1 + list(submits).index(kind))[-1]
        _check_signed(headers, sent, gw.client.get("/keys/webhook-secret", headers=gw.h(admin)).json()["secret"])
        assert json.loads(sent)["kind"] == kind and json.loads(sent)["status"] == "cancelled"
        gw.client.app.state.settings.webhook_allow_private = False


def test_a_real_worker_job_is_delivered_by_the_gateway_process(tiny_model, tmp_path, receiver: Receiver) -> None:
    """End to end: ``echo4o serve`` (embedded worker, tiny model) runs the job in another process; the gateway
    process notices its end and delivers it; the image URL in the body serves the image; its log holds no key
    and no secret."""
    from tests.support.stack import live_stack

    env = {"ECHO4O_WEBHOOK_ALLOW_PRIVATE": "true", "ECHO4O_WEBHOOK_POLL_S": "0.2", "ECHO4O_LOG_LEVEL": "DEBUG"}
    with live_stack(model=tiny_model, data_dir=tmp_path / "data", env=env) as stack, stack.client() as c:
        secret = c.get("/keys/webhook-secret").json()["secret"]
        r = c.post("/generate", json={**JOB, "seed": 5, "webhook_url": receiver.url})
        assert r.status_code == 202, r.text
        job = stack.wait_job(r.json()["id"])
        assert job["status"] == "succeeded", job
        headers, body = receiver.wait(1, timeout_s=120)[0]
        _check_signed(headers, body, secret)
        sent = json.loads(body)
        assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["params"]["seed"] == 5
        image = c.get(sent["result"]["images"][0]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        deadline = time.monotonic() + DEADLINE_S
        while c.get(f"/jobs/{job['id']}").json()["webhook"]["state"] != "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log = (stack.data_dir / "gateway.log").read_text(errors="replace")
    assert "webhook delivered" in log
    for text in (stack.admin_key, stack.user_key, stack.other_key, secret):
        assert text not in log


def test_the_dispatcher_outlives_a_database_outage(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    """Polls that fail (no database) are logged once, not every poll, and the dispatcher keeps polling."""
    import asyncio

    settings = get_settings().model_copy(update={
        "database_url": f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}", "webhook_poll_s": 0.01})
    dispatcher = webhooks.WebhookDispatcher(settings)
    ticks = 0
    tick = dispatcher.tick

    async def counted() -> int:
        nonlocal ticks
        ticks += 1
        return await tick()

    dispatcher.tick = counted  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(dispatcher.run())
        deadline = time.monotonic() + DEADLINE_S
        while ticks < 10:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="backend.services.webhooks"):
        # a loop of its own in a thread: an earlier test of the session may have left this thread's loop running
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, main()).result()
    failures = [r for r in caplog.records if "poll failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]


def test_a_named_host_is_reached_at_the_address_that_was_checked(make_gateway, receiver: Receiver) -> None:
    gw = make_gateway()
    port = receiver.server.server_address[1]
    job_id = gw.submit(webhook_url=f"http://localhost:{port}/hook?token=abc").json()["id"]
    _end_job(gw.database_url, job_id, "cancelled")
    headers, _ = receiver.wait(1)[0]
    assert headers["host"] == f"localhost:{port}"  # the receiver sees its own name
    gw.wait_webhook(job_id, ("delivered",))
    # the connection goes to the checked address; https keeps the name for TLS (SNI and the certificate check)
    assert webhooks.pinned("https://hooks.example.com:8443/h?x=1", ["2606:4700::1", "93.184.216.34"]) == (
        "https://93.184.216.34:8443/h?x=1", {"Host": "hooks.example.com:8443"},
        {"sni_hostname": "hooks.example.com"})
    assert webhooks.pinned("http://hooks.example.com/h", ["2606:4700::1"]) == (
        "http://[2606:4700::1]/h", {"Host": "hooks.example.com"}, {})
    assert webhooks.pinned("http://93.184.216.34/h", ["93.184.216.34"]) == ("http://93.184.216.34/h", {}, {})
