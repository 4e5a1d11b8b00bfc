"""``/metrics`` of a gateway of two processes (``ECHO4O_GATEWAY_PROCESSES=2``): whichever process a scrape
reaches, it answers the sum over both (prometheus_client's multiprocess mode), and a job that ended is observed
once, not once per process."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_proc import start_gateway

DEADLINE_S = 60.0


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_scrape_of_either_process_sums_both_and_counts_an_ended_job_once(tmp_path: Path, redis_url: str) -> None:
    rounds, per_round = 10, 20
    gw = start_gateway(tmp_path, redis_url, gateway_processes="2", log_level="INFO",
                       rate_limit_per_minute="1000", max_queued_jobs_per_key="1000")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while gw.log.read_text().count("gateway ready") < 2:
            assert time.monotonic() < deadline, f"the two gateway processes did not start:\n{gw.tail()}"
            time.sleep(0.05)
        ids: list[str] = []
        # a connection per request: the kernel hands each to one of the two processes
        with httpx.Client(base_url=gw.url, headers=gw.headers(), timeout=DEADLINE_S,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for _ in range(rounds):  # until both processes have accepted some
                for i in range(per_round):
                    r = client.post("/generate", json={"prompt": f"cube {len(ids) + i}", "num_steps": 2})
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["id"])
                if len(gw.answering_pids()) == 2:
                    break
            assert len(gw.answering_pids()) == 2, f"one process answered all {len(ids)} submits:\n{gw.tail()}"
            cancelled = ids[:5]  # no worker runs: a cancel ends a queued job at once
            for job_id in cancelled:
                assert client.delete(f"/jobs/{job_id}").status_code in (200, 202)
            submitted_key = ("echo4o_jobs_submitted_total", (("kind", "generate"),))
            ended_key = ("echo4o_job_latency_seconds_count", (("kind", "generate"), ("status", "cancelled")))
            scrapes = []
            for _ in range(12):  # fresh connections: both processes are scraped, several times each
                r = client.get("/metrics")
                assert r.status_code == 200
                scrapes.append(_samples(r.text))
    finally:
        gw.kill()
    assert [s.get(submitted_key) for s in scrapes] == [len(ids)] * len(scrapes)
    assert [s.get(ended_key) for s in scrapes] == [len(cancelled)] * len(scrapes)
