"""No accepted job is ever lost or run twice, whatever dies while the jobs run.

Two deployments, each fed tiny jobs through ``POST /generate`` by a client that submits again whatever was not
accepted (tests/chaos/harness.py says what counts as accepted, hit, lost and duplicate):

* Redis broker + PostgreSQL, a gateway and two ``echo4o worker`` processes: 200 jobs while a busy worker is
  SIGKILLed five times (a replacement started each time), Redis is SIGKILLed and started again on its
  append-only file, and the gateway is SIGKILLed and started again on the same port and database.
* Embedded (``echo4o serve`` with its worker child, SQLite, no Redis): 40 jobs while the worker child is
  SIGKILLed three times; ``echo4o serve`` starts a new child each time, which requeues the dead one's job from
  the records.

Then every accepted job must have succeeded, once, with one readable image in its results folder, and every job
a kill hit must record a second attempt. The figures are printed at the end of the pytest run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import (
    ChaosFigures,
    Records,
    Submitter,
    audit,
    kill_busy_worker,
    kill_embedded_worker,
    wait_all_finished,
    wait_embedded_ready,
    wait_until,
    wait_workers_ready,
)
from tests.support.redis_server import RedisServer
from tests.support.stack import Stack, fresh_database, live_stack

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

#: Settings of every process of both stacks.
ENV = {
    "ECHO4O_WORKER_HEARTBEAT_S": "1",  # a dead worker is noticed within seconds
    "ECHO4O_LOG_FORMAT": "json",  # the audit reads the workers' "job succeeded" and "requeued" events
    # the job timeout and Redis's visibility timeout keep their defaults (an hour and more): a killed worker's job
    # comes back only through the live workers' heartbeat sweep, within three beats, which is what is tested
    # one compute thread per process: three workers and a gateway share two cores here, and torch's default
    # (a thread per core, spinning at each barrier) made a tiny job take seconds instead of a tenth of one
    "OMP_NUM_THREADS": "1",
}
#: Deadline of each wait (a fault's moment, all jobs ending): turns a hang into a failure with the logs.
WAIT_S = 300.0


def _when_accepted(submitter: Submitter, stack: Stack, n: int) -> None:
    """Wait until ``n`` jobs were accepted: a fault that is not a kill strikes while the rest of its chunk is
    being submitted and run."""
    wait_until(lambda: len(submitter.accepted) >= n, what=f"{n} jobs accepted", timeout_s=WAIT_S,
               check=stack.check_alive, diagnose=stack.logs)


def test_redis_stack_loses_no_job_and_runs_none_twice(tmp_path: Path, tiny_model: Path, postgres_url: str) -> None:
    jobs = 200
    plan = ["kill", "kill", "redis", "kill", "gateway", "kill", "kill"]
    chunk = jobs // (len(plan) + 1)  # jobs released before each fault; the rest after the last
    figures = ChaosFigures("redis+postgresql, 2 workers")
    figures.report()  # printed at the end of the run, also when the test fails
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with fresh_database(postgres_url) as database_url, live_stack(
            model=tiny_model, data_dir=tmp_path / "data", database_url=database_url, broker_url=redis.url,
            workers=2, env=ENV,
        ) as stack:
            figures.note("stack started")
            records = Records(database_url)
            submitter = Submitter(stack, total=jobs).start()
            hit: dict[str, float] = {}
            try:
                for n, fault in enumerate(plan, start=1):
                    if fault == "kill":  # a worker dies among live ones: the last replacement is ready first
                        wait_workers_ready(stack, 2, timeout_s=WAIT_S)
                    figures.note(f"{len(submitter.accepted)} jobs accepted, {records.finished_count()} ended; "
                                 f"releasing {chunk} more, then {fault}")
                    submitter.allow(n * chunk)
                    if fault == "kill":
                        unfinished = kill_busy_worker(stack, records, timeout_s=WAIT_S,
                                                      feed=lambda: submitter.feed(records))
                        stack.add_worker()  # the replacement
                        hit.update(unfinished)
                        figures.kills += 1
                        figures.kills_mid_job += bool(unfinished)
                        figures.note(f"killed a worker, {len(unfinished)} job(s) left on it; replacement started")
                    elif fault == "redis":
                        _when_accepted(submitter, stack, (n - 1) * chunk + chunk // 2)
                        redis.restart()
                        figures.redis_restarts += 1
                        figures.note("redis killed and started again")
                    else:
                        _when_accepted(submitter, stack, (n - 1) * chunk + chunk // 2)
                        stack.restart_gateway()
                        figures.gateway_restarts += 1
                        figures.note("gateway killed, started again and ready")
                submitter.allow(jobs)
                submitter.join(WAIT_S)
                figures.note(f"all {jobs} jobs accepted")
            finally:
                submitter.stop()
            _check_every_job_ended_once(stack, records, submitter, hit, figures, jobs)
    finally:
        redis.stop()


def test_embedded_serve_loses_no_job_and_runs_none_twice(tmp_path: Path, tiny_model: Path) -> None:
    jobs, kills = 40, 2  # each restart of the child waits out serve's 30 s crash-loop guard
    chunk = jobs // (kills + 1)
    figures = ChaosFigures("embedded (echo4o serve, SQLite)")
    figures.report()  # printed at the end of the run, also when the test fails
    with live_stack(model=tiny_model, data_dir=tmp_path / "data", env=ENV) as stack:
        figures.note("stack started")
        records = Records(stack.database_url)
        submitter = Submitter(stack, total=jobs).start()
        hit: dict[str, float] = {}
        try:
            for n in range(1, kills + 1):
                wait_embedded_ready(stack, records, timeout_s=WAIT_S)
                figures.note(f"{len(submitter.accepted)} jobs accepted, {records.finished_count()} ended; "
                             f"releasing {chunk} more, then kill")
                submitter.allow(n * chunk)
                unfinished = kill_embedded_worker(stack, records, timeout_s=WAIT_S,
                                                  feed=lambda: submitter.feed(records))
                hit.update(unfinished)
                figures.kills += 1
                figures.kills_mid_job += bool(unfinished)
                figures.note(f"killed the worker child, {len(unfinished)} job(s) left on it; serve started another")
            submitter.allow(jobs)
            submitter.join(WAIT_S)
            figures.note(f"all {jobs} jobs accepted")
        finally:
            submitter.stop()
        _check_every_job_ended_once(stack, records, submitter, hit, figures, jobs)


def _check_every_job_ended_once(stack, records, submitter, hit, figures, jobs: int) -> None:
    """Wait until every accepted job ended, then audit them: all succeeded once with one image, hit jobs record
    another attempt, every submission was accepted, and at least one kill landed mid-job."""
    wait_all_finished(stack, records, submitter.accepted, timeout_s=WAIT_S, check=stack.check_alive)
    figures.note("all jobs ended")
    problems = audit(stack, records, submitter.accepted, hit, figures)
    records.close()
    figures.refused, figures.unanswered = submitter.refused, submitter.unanswered
    figures.finish()
    assert submitter.unexpected == [], "\n".join(submitter.unexpected)
    assert len(submitter.accepted) == jobs
    assert problems == [], "\n".join(problems[:40]) + "\n" + stack.logs(30)
    assert figures.kills_mid_job >= 1, "no kill landed while a job ran: the jobs are too short to hit"
