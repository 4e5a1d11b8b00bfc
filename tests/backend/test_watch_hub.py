"""Watching is cheap: every event stream and ``?wait`` of a gateway process shares one reader of the job row
(backend/services/watch_hub.py), told of changes by Redis pub/sub (echo4o/notify.py) or, without Redis, polling
once for all watchers.

* Live stack on Redis (gateway + one worker, tiny model): many SSE watchers of one job each get every step once,
  in order, and the end; the job-row reads the gateway makes meanwhile (``echo4o_job_row_reads_total``) do not
  grow with the number of watchers; a client that reconnects with ``Last-Event-ID`` gets the rest, nothing again.
* In process: the embedded-mode poller (SQLite, no broker) fans one read out to many streams; with Redis, a
  change whose message never came is found by the safety poll, and a message makes the hub re-read at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest

from backend.services import watch_hub
from backend.services.events import job_events
from backend.services.watch_hub import SAFETY_POLL_S, WatchHub
from echo4o import notify
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import MAX_SIDE, MAX_STEPS
from echo4o.settings import Settings, get_settings
from tests.support.stack import Stack, live_stack

WATCHERS = 60
STEPS = 8  # num_steps: the sampler reports STEPS - 1 steps
JOB = {"prompt": "a red cube on a table", "height": 32, "width": 32, "num_steps": STEPS}
# holds the only worker until cancelled: the largest side and the most steps, minutes of tiny-model sampling on a
# CPU (at 256 px it once ended by itself, on a loaded machine, before 60 streams were open)
BLOCKER = {"prompt": "a blue sphere", "height": MAX_SIDE, "width": MAX_SIDE, "num_steps": MAX_STEPS}
DEADLINE_S = 120  # generous: a shared, loaded machine; no timing is asserted


def _run(fn, *args):
    """Run the async ``fn(*args)`` on a thread of its own (a session's browser tests may hold the main thread's
    event loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn(*args))).result()


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, module_redis_url: str) -> Iterator[Stack]:
    with live_stack(model=tiny_model, data_dir=tmp_path_factory.mktemp("watch-stack"), broker_url=module_redis_url,
                    env={"ECHO4O_WORKER_HEARTBEAT_S": "1"}) as s:
        yield s


async def _follow(client: httpx.AsyncClient, url: str, first: asyncio.Event | None = None,
                  last_event_id: str | None = None) -> list[tuple[str, str | None, dict]]:
    """(event, id, data) of every event of a stream, up to the one that ends it; ``first`` is set at the first."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[tuple[str, str | None, dict]] = []
    async with client.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        name = event_id = None
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("id:"):
                event_id = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, event_id, json.loads(line.split(":", 1)[1])))
                if first is not None:
                    first.set()
                if name in ("done", "failed", "cancelled"):
                    return events
                name = event_id = None
    raise AssertionError(f"the stream ended without an end event: {events}")


def _row_reads(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("echo4o_job_row_reads_total "):
            return float(line.split()[1])
    raise AssertionError("echo4o_job_row_reads_total is not in /metrics")


async def _many_watchers(stack: Stack) -> dict:
    limits = httpx.Limits(max_connections=WATCHERS + 10, max_keepalive_connections=10)
    async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers(), timeout=DEADLINE_S,
                                 limits=limits) as c:
        blocker = (await c.post("/generate", json=BLOCKER)).json()
        job = (await c.post("/generate", json=JOB)).json()
        firsts = [asyncio.Event() for _ in range(WATCHERS)]
        watchers = [asyncio.create_task(_follow(c, job["events_url"], first)) for first in firsts]
        async with asyncio.timeout(DEADLINE_S):
            for first in firsts:  # every stream is open and has seen the job queued
                await first.wait()
        reads_before = _row_reads((await c.get("/metrics")).text)
        t0 = time.monotonic()
        assert (await c.delete(f"/jobs/{blocker['id']}")).status_code in (200, 202)  # the job runs now
        async with asyncio.timeout(DEADLINE_S):
            streams = await asyncio.gather(*watchers)
        elapsed = time.monotonic() - t0
        reads = _row_reads((await c.get("/metrics")).text) - reads_before
        progress = [e for e in streams[0] if e[0] == "progress"]
        resume_from = progress[2][1]
        async with asyncio.timeout(DEADLINE_S):
            resumed = await _follow(c, job["events_url"], last_event_id=resume_from)
    return {"streams": streams, "reads": reads, "elapsed": elapsed, "resume_from": resume_from,
            "resumed": resumed}


def test_many_sse_watchers_share_one_reader_and_each_sees_every_step_once(stack: Stack) -> None:
    out = _run(_many_watchers, stack)
    total = STEPS - 1
    for events in out["streams"]:
        names = [name for name, _, _ in events]
        assert names[0] == "queued" and names[-1] == "done", names
        assert set(names[:-1]) <= {"queued", "progress"}, names
        progress = [(data["step"], data["total"]) for name, _, data in events if name == "progress"]
        assert progress == [(s, total) for s in range(1, total + 1)], progress
        ids = [event_id for name, event_id, _ in events if name == "progress"]
        assert len(set(ids)) == total and all(ids), ids
        assert events[-1][2]["status"] == "succeeded"
    # one read per change of the row (a progress write or a state change), shared by all the watchers, and the
    # slow safety poll: none of it grows with the number of watchers
    bound = 2 * (total + 6) + out["elapsed"] / SAFETY_POLL_S + 2
    assert out["reads"] <= bound, (out["reads"], bound, out["elapsed"])
    assert out["reads"] < WATCHERS, out["reads"]

    # reconnecting with the id of the third step: the rest of the steps and the end, none again
    resumed = out["resumed"]
    assert out["resume_from"].split(":")[0] == "3"
    steps = [data["step"] for name, _, data in resumed if name == "progress"]
    assert steps == list(range(4, total + 1)), resumed
    assert resumed[-1][0] == "done" and [n for n, _, _ in resumed[:-1]] == ["progress"] * (total - 3)


def test_wait_returns_the_ended_job_through_the_hub(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post("/generate", params={"wait": DEADLINE_S}, json=JOB)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and len(r.json()["result"]["images"]) == 1


# --- in process -------------------------------------------------------------------------------------------------

def _running_job(url: str) -> str:
    upgrade_to_head(url)
    with session_scope(url) as s:
        job = crud.create_job(session=s, kind="generate", params={"prompt": "p"}, model_version="v1")
        assert crud.mark_running(session=s, job_id=job.id, worker="test:1", gpu=None)
        return job.id


def _write(url: str, job_id: str, step: int, total: int) -> None:
    with session_scope(url) as s:
        crud.update_progress(session=s, job_id=job_id, step=step, total=total)


async def _embedded_fan_out(settings: Settings, job_id: str, watchers: int) -> tuple[list[list[dict]], int, float]:
    hub = WatchHub(settings)
    assert not hub.notifications  # no broker: the hub polls
    seen = [0] * watchers
    progressed = asyncio.Event()

    async def follow(i: int) -> list[dict]:
        events = []
        async for event in job_events(settings, job_id, "http://test", hub=hub):
            events.append(event)
            if event["event"] == "progress":
                seen[i] = json.loads(event["data"])["step"]
                progressed.set()
        return events

    t0 = time.monotonic()
    tasks = [asyncio.create_task(follow(i)) for i in range(watchers)]
    async with asyncio.timeout(DEADLINE_S):
        for step in (1, 2, 5, 6):  # 3 and 4 are never in a row: each stream still reports them
            await anyio.to_thread.run_sync(_write, settings.database_url, job_id, step, 6)
            while min(seen) < step:
                progressed.clear()
                await progressed.wait()
        with session_scope(settings.database_url) as s:
            assert crud.mark_succeeded(session=s, job_id=job_id, result={"images": []})
        streams = await asyncio.gather(*tasks)
    return streams, hub.row_reads, time.monotonic() - t0


def test_embedded_poller_reads_once_for_all_watchers() -> None:
    settings = get_settings()
    job_id = _running_job(settings.database_url)
    streams, reads, elapsed = _run(_embedded_fan_out, settings, job_id, 50)
    for events in streams:
        steps = [json.loads(e["data"])["step"] for e in events if e["event"] == "progress"]
        assert steps == [1, 2, 3, 4, 5, 6] and events[-1]["event"] == "done", events
    # one read per poll for all 50 streams (not one per stream per poll)
    assert reads <= elapsed / 0.1 + 5, (reads, elapsed)


async def _lost_and_sent(settings: Settings, redis_url: str, job_id: str) -> dict:
    # a message that never comes (the write below publishes nothing: the test process has no broker setting)
    safety = WatchHub(settings, safety_poll_s=0.5, persistent=True)
    await safety.start()
    notified = WatchHub(settings, safety_poll_s=3600, persistent=True)
    await notified.start()
    out: dict = {}
    try:
        assert safety.live and notified.live
        async with safety.watch(job_id) as watch:
            first = await anext(watch)
            await anyio.to_thread.run_sync(_write, settings.database_url, job_id, 2, 9)
            async with asyncio.timeout(DEADLINE_S):
                found = await anext(watch)
            out["safety"] = (first.job.progress_step, found.job.progress_step, safety.messages, safety.live)
        async with notified.watch(job_id) as watch:
            first = await anext(watch)
            await anyio.to_thread.run_sync(_write, settings.database_url, job_id, 3, 9)
            publisher = notify.Publisher(redis_url)
            try:
                assert publisher.publish(job_id)
            finally:
                publisher.close()
            async with asyncio.timeout(DEADLINE_S):
                found = await anext(watch)
            out["notified"] = (first.job.progress_step, found.job.progress_step, notified.messages)
    finally:
        await safety.stop()
        await notified.stop()
    return out


def test_a_lost_message_is_made_up_by_the_safety_poll_and_a_message_is_acted_on(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url)
    assert not notify.supports(get_settings().broker_url)  # this process's own writes publish nothing
    job_id = _running_job(settings.database_url)
    out = _run(_lost_and_sent, settings, redis_url, job_id)
    assert out["safety"] == (0, 2, 0, True)  # subscribed all along, no message: the safety poll found step 2
    first, found, messages = out["notified"]
    assert (first, found) == (2, 3) and messages >= 1  # a one-hour safety poll: the message made the read


async def _waited_only(settings: Settings, redis_url: str, job_id: str) -> dict:
    hub = WatchHub(settings, safety_poll_s=3600, persistent=True)
    await hub.start()
    publisher = notify.Publisher(redis_url)
    out: dict = {}

    async def heard(n: int) -> None:  # the hub has received n messages in all
        async with asyncio.timeout(DEADLINE_S):
            while hub.messages < n:
                await asyncio.sleep(0.01)

    try:
        assert hub.live
        async with hub.watch(job_id, progress=False) as waiting:
            first = await anext(waiting)
            reads = hub.row_reads
            for step in (1, 2, 3):  # progress writes, each with its message: nobody shows progress, nothing is read
                await anyio.to_thread.run_sync(_write, settings.database_url, job_id, step, 9)
                assert publisher.publish(job_id)
                await heard(step)
            out["reads_for_progress"] = hub.row_reads - reads
            async with hub.watch(job_id) as stream:  # an event stream joins: the row is read for it
                async with asyncio.timeout(DEADLINE_S):
                    steps = [(await anext(stream)).job.progress_step]  # the snapshot the hub has, then the row's
                    while steps[-1] != 3:
                        steps.append((await anext(stream)).job.progress_step)
                    out["stream_steps"] = steps
                    with session_scope(settings.database_url) as s:
                        assert crud.mark_succeeded(session=s, job_id=job_id, result={"images": []})
                    assert publisher.publish(job_id, "succeeded")
                    end = [snap async for snap in waiting][-1]  # the iteration stops after the end
            out["waited"] = (first.job.status, end.job.status)
    finally:
        publisher.close()
        await hub.stop()
    return out


def test_a_wait_reads_no_progress_and_an_event_stream_joining_it_gets_the_progress(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url)
    job_id = _running_job(settings.database_url)
    out = _run(_waited_only, settings, redis_url, job_id)
    assert out["reads_for_progress"] == 0  # a ?wait needs the end only: three progress messages, no read
    assert out["stream_steps"] == [0, 3]  # the hub's last snapshot at once, then the row read for the stream
    assert out["waited"] == ("running", "succeeded")


def _events_of(chunk: bytes) -> list[tuple[str, dict]]:
    """(event, data) of every SSE message in one written chunk."""
    out = []
    for message in chunk.decode().replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in message.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


async def _crowd(settings: Settings, job_id: str, watchers: int, interval_s: float) -> list[list[tuple]]:
    hub = WatchHub(settings, crowd_watchers=3, crowd_interval_s=interval_s)
    loop = asyncio.get_running_loop()

    async def follow() -> list[tuple[float, list[tuple[str, dict]]]]:
        return [(loop.time(), _events_of(chunk))
                async for chunk in job_events(settings, job_id, "http://test", hub=hub, as_bytes=True)]

    async with hub.watch(job_id) as probe:  # the hub's current snapshot, whatever the watchers took
        tasks = [asyncio.create_task(follow()) for _ in range(watchers)]
        async with asyncio.timeout(DEADLINE_S):
            for step in range(1, 7):  # each step read by the hub before the next is written
                await anyio.to_thread.run_sync(_write, settings.database_url, job_id, step, 6)
                while probe.snapshot is None or probe.snapshot.job.progress_step != step:
                    await asyncio.sleep(0.01)
            with session_scope(settings.database_url) as s:
                assert crud.mark_succeeded(session=s, job_id=job_id, result={"images": []})
            return await asyncio.gather(*tasks)


def test_a_crowd_takes_a_snapshot_at_most_every_interval_and_still_gets_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    job_id = _running_job(settings.database_url)
    interval = 0.3
    releases: list[tuple[float, bool]] = []  # (loop time, ended) of each release to the crowd, as the hub made it
    release = watch_hub._Entry.release

    def recorded(entry: watch_hub._Entry) -> None:
        release(entry)
        releases.append((entry.released_at, entry.snapshot is not None and entry.snapshot.ended))

    monkeypatch.setattr(watch_hub._Entry, "release", recorded)
    streams = _run(_crowd, settings, job_id, 10, interval)
    for chunks in streams:
        events = [event for _, chunk in chunks for event in chunk]
        assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3, 4, 5, 6], events
        assert events[-1][0] == "done"
        assert len(chunks) <= len(releases) + 1, (chunks, releases)  # one write per snapshot taken
    # no two releases within the interval but for the end (the hub's own times: a watcher's wake-up on a busy
    # loop can come late, which shortens the gap it sees to the next)
    assert releases[-1][1] and not any(ended for _, ended in releases[:-1]), releases
    times = [t for t, _ in releases[:-1]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps and all(gap >= interval - 1e-6 for gap in gaps), gaps


async def _ended_before_positions(settings: Settings, redis_url: str, ended_id: str, queued_ids: list[str]) -> list:
    order: list = []
    hub = WatchHub(settings, safety_poll_s=3600, persistent=True, on_rows_read=lambda n: order.append(("read", n)))
    await hub.start()
    publisher = notify.Publisher(redis_url)
    try:
        assert hub.live
        async with contextlib.AsyncExitStack() as watches:
            waiting = await watches.enter_async_context(hub.watch(ended_id, progress=False))
            assert (await anext(waiting)).job.status == "running"
            for job_id in queued_ids:  # event streams of jobs queued behind it
                stream = await watches.enter_async_context(hub.watch(job_id))
                assert (await anext(stream)).job.status == "queued"
            order.clear()
            with session_scope(settings.database_url) as s:
                assert crud.mark_succeeded(session=s, job_id=ended_id, result={"images": []})
            assert publisher.publish(ended_id, "succeeded")
            async with asyncio.timeout(DEADLINE_S):
                assert [snap async for snap in waiting][-1].job.status == "succeeded"
                order.append("ended job answered")
                while sum(n for step in order if step != "ended job answered" for n in step[1:]) \
                        < 1 + len(queued_ids):
                    await asyncio.sleep(0.01)
    finally:
        publisher.close()
        await hub.stop()
    return order


def test_an_ended_job_is_answered_before_the_queue_positions_behind_it_are_read(redis_url: str) -> None:
    """A job's end also re-reads the watched queued jobs (their positions may move): those reads come after the
    ended job's, so its ``?wait`` answer and ``done`` event do not wait for them."""
    settings = Settings(broker_url=redis_url)
    ended_id = _running_job(settings.database_url)
    with session_scope(settings.database_url) as s:
        queued = [crud.create_job(session=s, kind="generate", params={"prompt": f"p{i}"}, model_version="v1").id
                  for i in range(5)]
    order = _run(_ended_before_positions, settings, redis_url, ended_id, queued)
    assert order == [("read", 1), "ended job answered", ("read", 5)], order
