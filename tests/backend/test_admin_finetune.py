"""``POST /admin/finetune`` on a live stack (gateway subprocess, Redis, a gpu worker and a train worker, the
tiny model): admin keys only, 422 naming the field, and the run is an ordinary job: its event stream carries
the loss, GET /jobs/{id} shows the new version, DELETE cancels a running one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.backend.test_gateway_live import sse
from tests.support.stack import Stack, live_stack
from tests.support.worker_proc import WorkerProcess
from worker.training.data import TEXT_TO_IMAGE, write_test_dataset

#: The tiny model at 32 px, one sample per step, a large lr: every step takes a fraction of a second.
SMALL_RUN = {"mode": "lora", "lr": 2e-3, "warmup_steps": 0, "expected_tokens": 1, "max_tokens": 400,
             "vae_min_size": 32, "vae_max_size": 32}


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, module_redis_url: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("finetune-stack")
    env = {"ECHO4O_WEIGHTS_DIR": str(root / "weights"), "ECHO4O_WORKER_HEARTBEAT_S": "1"}
    with live_stack(model=tiny_model, data_dir=root / "data", broker_url=module_redis_url, env=env) as s:
        trainer = WorkerProcess(env=s.env, queues="train", log_path=s.data_dir / "train-worker.log",
                                database_url=s.database_url)
        s.workers.append(trainer.start())
        trainer.wait_ready()
        yield s


@pytest.fixture(scope="module")
def dataset(stack: Stack) -> str:
    return str(write_test_dataset(stack.data_dir / "datasets" / "t2i", TEXT_TO_IMAGE, num_rows=2))


def test_only_admin_keys_may_start_a_run(stack: Stack, dataset: str) -> None:
    with stack.client("admin") as admin:
        before = admin.get("/jobs", params={"all": True}).json()["count"]
        for key, status in (("user", 403), (None, 401)):
            with stack.client(key) as c:
                r = c.post("/admin/finetune", json={"dataset": dataset, "steps": 2})
            assert r.status_code == status, r.text
        assert admin.get("/jobs", params={"all": True}).json()["count"] == before  # nothing was queued


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"dataset": "/etc"}, "dataset", "outside the folders datasets may be read from"),
    ({"dataset": "relative/../../x"}, "dataset", "neither an absolute path nor a Hub dataset id"),
    ({"dataset": "{data_dir}/" + "a" * 600}, "dataset", "cannot be read (File name too long)"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"mode": "qlora"}, "mode", "'lora' or 'full'"),
    ({"max_tokens": 400}, "max_tokens", "expected_tokens is missing"),
    ({"base_version": "nope/v1"}, "base_version", "'nope/v1' is not registered"),
    ({"output_version": "a/b"}, "output_version", "must be 1-64 letters"),
    ({"epochs": 3}, "epochs", "Extra inputs are not permitted"),
])
def test_bad_fields_are_422_naming_the_field(stack: Stack, dataset: str, body: dict, param: str, text: str) -> None:
    body = {k: v.replace("{data_dir}", str(stack.data_dir)) if isinstance(v, str) else v for k, v in body.items()}
    with stack.client("admin") as c:
        r = c.post("/admin/finetune", json={"dataset": dataset, **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_a_run_streams_its_loss_and_ends_with_a_registered_version(stack: Stack, dataset: str) -> None:
    with stack.client("admin") as c:
        r = c.post("/admin/finetune", json={"dataset": dataset, "steps": 4, "save_every": 2, **SMALL_RUN})
        assert r.status_code == 202, r.text
        created = r.json()
        with c.stream("GET", created["events_url"]) as stream:
            events = list(sse(stream.iter_lines()))
        job = c.get(created["status_url"]).json()
        versions = c.get("/admin/models").json()
    progress = [data for name, data in events if name == "progress"]
    # steps read after the job ended are reported under the row's final stage, "done"
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and {p["stage"] for p in progress} <= {"train", "done"}
    assert all(isinstance(p["detail"]["loss"], float) for p in progress if "detail" in p)
    assert progress[-1]["detail"]["losses"][-1][0] == 4
    assert events[-1][0] == "done"
    assert job["kind"] == "finetune" and job["status"] == "succeeded"
    details = job["result"]["details"]
    assert details["steps"] == 4 and details["version"] == f"{stack.model.name}/{job['params']['output_version']}"
    assert job["params"]["base_version"] == stack.model.name and job["params"]["lr"] == 2e-3
    listed = {v["ref"]: v for v in versions["data"]}
    assert listed[details["version"]]["source"] == "finetune"
    assert listed[details["version"]]["manifest"]["steps"] == 4


def test_a_running_run_is_cancelled_by_delete(stack: Stack, dataset: str) -> None:
    with stack.client("admin") as c:
        r = c.post("/admin/finetune", json={"dataset": dataset, "steps": 100_000, "save_every": 1, **SMALL_RUN})
        assert r.status_code == 202, r.text
        created = r.json()
        with c.stream("GET", created["events_url"]) as stream:
            first = next((data for name, data in sse(stream.iter_lines()) if name == "progress"), None)
        assert first is not None and first["stage"] == "train"
        assert c.delete(created["status_url"]).status_code == 200
    job = stack.wait_job(created["id"], key="admin")
    assert job["status"] == "cancelled" and job["progress"]["step"] < 100_000
    run = stack.data_dir / "finetune" / created["id"]
    assert run.is_dir() and not (run / "checkpoints").exists()  # a cancelled run's checkpoint is deleted
    with httpx.Client(base_url=stack.url, headers=stack.headers("admin")) as c:
        assert c.get("/admin/queue").json()["running"] == 0
