"""Helpers of the UI tests that are not fixtures: the longest job the gateway allows, and waiting for a job's
first progress event on the gateway's event stream."""

from __future__ import annotations

import httpx


def long_job_fields(parameters: dict) -> dict:
    """Request fields of the longest job the gateway allows (largest preset size, most steps and images), so
    that a cancel sent after its first progress event lands mid-run even on a fast machine."""
    limits = parameters["limits"]
    largest = max(parameters["aspect_ratios"], key=lambda a: parameters["aspect_ratios"][a][0] * parameters[
        "aspect_ratios"][a][1])
    return {"aspect": largest, "num_steps": limits["steps_max"], "num_images": limits["num_images_max"]}


def wait_for_first_progress(stack, job_id: str, *, key: str = "user", read_timeout_s: float = 240.0) -> dict:
    """Follow the job's event stream (``GET /jobs/{id}/events``) until its first ``progress`` event, and
    return that event's data: the job is then running. Fails if the job ends first."""
    from httpx_sse import connect_sse

    with stack.client(key) as c, connect_sse(c, "GET", f"/jobs/{job_id}/events",
                                             timeout=httpx.Timeout(30.0, read=read_timeout_s)) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if sse.event == "progress":
                return sse.json()
            if sse.event in ("done", "failed", "cancelled"):
                raise AssertionError(f"job {job_id} ended ({sse.event}) before any progress event\n{stack.logs()}")
    raise AssertionError(f"the event stream of job {job_id} ended without a progress event\n{stack.logs()}")
