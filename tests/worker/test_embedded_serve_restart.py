"""Embedded mode (``echo4o serve`` without a broker, its one worker as a child): the worker SIGKILLed mid-job is
started again by the gateway, and the new one requeues the job as it starts; the job succeeds, once (attempts 2)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from echo4o.jobs import MAX_STEPS, MIN_SIDE
from tests.support.stack import live_stack
from tests.support.worker_proc import wait_for_progress


def test_serve_restarts_its_killed_worker_and_the_job_runs_again(tiny_model: Path, tmp_path: Path) -> None:
    env = {"ECHO4O_AUTH": "off", "ECHO4O_WORKER_HEARTBEAT_S": "1"}
    with live_stack(model=tiny_model, data_dir=tmp_path / "stack", env=env) as stack:
        with stack.client(None) as c:
            r = c.post("/generate", json={"prompt": "restart", "seed": 1, "height": MIN_SIDE, "width": MIN_SIDE,
                                          "num_steps": MAX_STEPS})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
        first = wait_for_progress(job_id, database_url=stack.database_url)
        pid = int(first.worker.rpartition(":")[2])
        os.kill(pid, signal.SIGKILL)

        job = stack.wait_job(job_id, key=None)
        assert job["status"] == "succeeded", (job.get("error"), stack.logs())
        assert job["worker"] != first.worker and len(job["result"]["images"]) == 1
        log = stack.gateway_log.read_text(errors="replace")
        assert "embedded worker died; starting another" in log
        assert "requeued a job whose worker is gone" in log
        assert len(list((stack.data_dir / "results" / job_id).iterdir())) == 1
