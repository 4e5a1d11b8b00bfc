"""Promote and rollback with a real gateway and a real worker subprocess (Redis broker): the worker switches
between jobs without a restart, and a job naming the older version still runs on it."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from echo4o import versions
from echo4o.db import session_scope
from tests.support.stack import Stack, live_stack
from worker.engine.tiny import write_tiny_model

JOB = {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 3, "seed": 7}


@pytest.fixture
def stack(tiny_model: Path, tmp_path: Path, redis_url: str):
    with live_stack(model=tiny_model, data_dir=tmp_path / "stack", broker_url=redis_url,
                    env={"ECHO4O_RESIDENT_MODELS": "2"}) as s:
        yield s


def _run(stack: Stack, c: httpx.Client, **fields) -> tuple[dict, bytes]:
    r = c.post("/generate", json={**JOB, **fields})
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["id"])
    assert job["status"] == "succeeded", job
    png = c.get(job["result"]["images"][0]["url"])
    assert png.status_code == 200
    with Image.open(io.BytesIO(png.content)) as img:
        assert img.text["model_version"] == job["model_version"]  # the PNG says which version drew it
        return job, img.convert("RGB").tobytes()


def test_promote_switches_new_jobs_old_version_still_runs_rollback(stack: Stack, tmp_path: Path) -> None:
    base = stack.model.name
    v2_dir = write_tiny_model(tmp_path / "weights" / "tiny" / "v2", seed=1)
    with session_scope(stack.database_url) as s:
        versions.register_version(s, name="tiny", version="v2", path=v2_dir, manifest={"seed": 1}, source="import")

    with stack.client() as c, stack.client("admin") as admin:
        first, base_image = _run(stack, c)
        assert first["model_version"] == base
        assert admin.post("/admin/models/tiny/v2/promote").json() == {"current": "tiny/v2", "previous": base}

        promoted, v2_image = _run(stack, c)
        assert promoted["model_version"] == "tiny/v2"
        assert v2_image != base_image  # other weights, same seed
        named_old, old_image = _run(stack, c, model_version=base)
        assert named_old["model_version"] == base and old_image == base_image
        again, again_image = _run(stack, c)  # v2 stayed resident: same image as before
        assert again["model_version"] == "tiny/v2" and again_image == v2_image

        assert admin.post("/admin/models/rollback").json() == {"current": base, "previous": "tiny/v2"}
        after, after_image = _run(stack, c)
        assert after["model_version"] == base and after_image == base_image

    worker = stack.workers[0]
    assert {j["worker"] for j in (first, promoted, named_old, again, after)} == {worker.worker_id}  # no restart
    log = worker.logs()
    assert log.count("loading model version") == 1  # tiny/v2, once: both versions stay resident (2 allowed)
    # echo4o/heap.py: what the worker held when ready (the base version), then tiny/v2 once loaded, is frozen out
    # of the collector's full passes, as is the gateway's app once started
    frozen = [_objects(line) for line in log.splitlines() if "long-lived objects frozen" in line]
    assert len(frozen) == 2 and frozen[1] > frozen[0] > 10_000, frozen
    assert "long-lived objects frozen" in stack.gateway_log.read_text(), stack.logs()


def _objects(line: str) -> int:
    return int(line.split("objects=")[1].split()[0])
