"""Graceful gateway shutdown: ``echo4o serve`` (uvicorn, a subprocess) given SIGTERM drains what is in flight.

A client following a job's event stream sees the stream end (the last chunk arrives: no reset, no truncated
body), a submit in flight (held open by ``?wait``) gets its answer, and the process exits 0. Redis is the broker
and no worker runs, so the job stays queued and its stream would otherwise go on for ever.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.gateway_proc import GatewayProcess as Gateway
from tests.support.gateway_proc import start_gateway

DEADLINE_S = 60.0


@dataclass
class Outcome:
    """What a client thread saw: its lines or answer, and the exception it ended with, if any."""

    lines: list[str] = field(default_factory=list)
    status: int | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def follow_events(gw: Gateway, job_id: str, out: Outcome) -> None:
    try:
        with httpx.stream("GET", f"{gw.url}/jobs/{job_id}/events", headers=gw.headers(),
                          timeout=httpx.Timeout(DEADLINE_S)) as r:
            out.status = r.status_code
            for line in r.iter_lines():  # ends without error only when the body ended properly
                out.lines.append(line)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        out.error = exc
    finally:
        out.done.set()


def submit_waiting(gw: Gateway, out: Outcome) -> None:
    try:
        r = httpx.post(f"{gw.url}/generate?wait=3", json={"prompt": "a lighthouse", "num_steps": 2},
                       headers=gw.headers(), timeout=DEADLINE_S)
        out.status, out.lines = r.status_code, [r.text]
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        out.error = exc
    finally:
        out.done.set()


def poll(condition, what: str, gw: Gateway) -> None:  # noqa: ANN001
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {DEADLINE_S:.0f} s:\n{gw.tail()}")
        time.sleep(0.05)


@pytest.fixture(params=[1, 2], ids=["one-process", "two-processes"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Gateway]:
    """``echo4o serve``, in one process or in two sharing the port (ECHO4O_GATEWAY_PROCESSES): a SIGTERM to the
    command drains both alike."""
    gw = start_gateway(tmp_path, redis_url, wait_max_s="30", log_level="INFO",
                       gateway_processes=str(request.param))
    poll(lambda: gw.log.read_text().count("gateway ready") == request.param, "every gateway process's start", gw)
    try:
        yield gw
    finally:
        gw.kill()


def test_sigterm_ends_event_streams_cleanly_and_lets_a_submit_in_flight_finish(gateway: Gateway) -> None:
    gw = gateway
    job = httpx.post(f"{gw.url}/generate", json={"prompt": "a red cube", "num_steps": 2}, headers=gw.headers(),
                     timeout=30).json()
    stream = Outcome()
    threading.Thread(target=follow_events, args=(gw, job["id"], stream), daemon=True).start()
    poll(lambda: "event: queued" in stream.lines, "the first event of the stream", gw)

    submit = Outcome()
    threading.Thread(target=submit_waiting, args=(gw, submit), daemon=True).start()
    poll(lambda: gw.job_count() == 2, "the waiting submit's job row", gw)  # it is in flight now

    gw.proc.send_signal(signal.SIGTERM)
    assert stream.done.wait(DEADLINE_S), f"the event stream was not ended:\n{gw.tail()}"
    assert stream.error is None, f"the stream broke instead of ending: {stream.error!r}\n{gw.tail()}"
    assert stream.status == 200 and stream.lines[:2] == ["event: queued", 'data: {"position": 1}'], stream.lines

    assert submit.done.wait(DEADLINE_S), f"the submit in flight got no answer:\n{gw.tail()}"
    assert submit.error is None, f"the submit in flight was cut off: {submit.error!r}\n{gw.tail()}"
    assert submit.status == 202, submit.lines  # ?wait ran out (no worker): the usual 202
    assert gw.proc.wait(timeout=DEADLINE_S) == 0, gw.tail()


def test_new_connections_are_refused_once_stopped(gateway: Gateway) -> None:
    gw = gateway
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=DEADLINE_S) == 0, gw.tail()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/healthz", timeout=5)


def test_two_processes_share_the_port_and_each_records_what_it_accepts(tmp_path: Path, redis_url: str) -> None:
    rounds, per_round = 10, 40
    gw = start_gateway(tmp_path, redis_url, gateway_processes="2", log_level="INFO",
                       rate_limit_per_minute=str(rounds * per_round), max_queued_jobs_per_key=str(rounds * per_round))
    try:
        poll(lambda: gw.log.read_text().count("gateway ready") == 2, "both gateway processes' start", gw)
        submitted = 0
        with httpx.Client(headers=gw.headers(), timeout=DEADLINE_S,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:  # a connection each
            def submit(i: int) -> int:
                return client.post(f"{gw.url}/generate", json={"prompt": f"cube {i}", "num_steps": 2}).status_code

            # the kernel hands each new connection to one of the two accepting processes, not in turn: submit in
            # rounds until both have answered (ten rounds without the second one is a failure)
            for _ in range(rounds):
                with ThreadPoolExecutor(8) as pool:
                    statuses = list(pool.map(submit, range(submitted, submitted + per_round)))
                assert statuses == [202] * per_round
                submitted += per_round
                if len(gw.answering_pids()) == 2:
                    break
        assert gw.job_count() == submitted
        pids = gw.answering_pids()
        assert len(pids) == 2, f"{submitted} submissions were answered by {pids or 'no'} process(es):\n{gw.tail()}"
    finally:
        gw.kill()
