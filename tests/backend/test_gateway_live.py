"""The gateway end to end: a uvicorn subprocess, Redis as broker, a real `echo4o worker` subprocess running the
tiny model, job records on SQLite and on PostgreSQL (the whole module runs once per database).

Each test makes the jobs it asserts about and leaves none active (``_no_job_left_active`` cancels leftovers of a
test that failed), so the tests pass alone and in any order. A test that needs the only worker busy starts a
job long enough to still be running on a slow machine (:func:`start_long_job`) and waits for its first
progress event before going on."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from collections.abc import Iterable, Iterator

import httpx
import pytest
from PIL import Image

from echo4o.jobs import ACTIVE_STATUSES, MAX_NUM_IMAGES, MAX_STEPS, GenerateJob
from echo4o.pnginfo import params_from_png
from tests.support.stack import Stack, fresh_database, live_stack
from tests.support.worker_proc import POLL_S, WAIT_S

SMALL = {"height": 32, "width": 32, "num_steps": 2}
# The most steps a job may have, at a size that costs about a second per step on a CPU: still running long
# after its first step, so a cancel or a second submit lands while it holds the only worker.
LONG = {"height": 256, "width": 256, "num_steps": MAX_STEPS}


def _start(request: pytest.FixtureRequest, database: str) -> Iterator[Stack]:
    with contextlib.ExitStack() as cleanup:
        database_url = None
        if database == "postgresql":
            database_url = cleanup.enter_context(fresh_database(request.getfixturevalue("postgres_url")))
        stack = cleanup.enter_context(live_stack(
            model=request.getfixturevalue("tiny_model"),
            data_dir=request.getfixturevalue("tmp_path_factory").mktemp(f"stack-{database}"),
            broker_url=request.getfixturevalue("module_redis_urls")(0 if database == "sqlite" else 1),
            database_url=database_url,
            env={"ECHO4O_WORKER_HEARTBEAT_S": "1", "ECHO4O_PREVIEW_EVERY": "1",
                 "ECHO4O_MAX_UPLOAD_BYTES": str(256 * 1024), "ECHO4O_MAX_IMAGE_PIXELS": "1000000"}))
        yield stack


@pytest.fixture(scope="module")
def sqlite_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from _start(request, "sqlite")


@pytest.fixture(scope="module")
def postgresql_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from _start(request, "postgresql")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """Tests taking `stack` run on both databases; multi-reference jobs (references are encoded at 512 px and
    up, the slow part on a CPU) run on the SQLite stack only."""
    return request.getfixturevalue(f"{request.param}_stack")


@pytest.fixture(autouse=True)
def _no_job_left_active(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, cancel whatever it left queued or running (only a failed test leaves any) and wait
    for it to end, so the next test finds the worker idle."""
    stacks: list[Stack] = [request.getfixturevalue(n) for n in ("stack", "sqlite_stack") if n in request.fixturenames]
    yield
    for stack in stacks:
        with stack.client("admin") as c:
            active = [j for status in ACTIVE_STATUSES
                      for j in c.get("/jobs", params={"status": status, "all": True, "limit": 200}).json()["data"]]
            for job in active:
                c.delete(f"/jobs/{job['id']}")
        for job in active:
            stack.wait_job(job["id"], key="admin")


def png(color: str, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def submit(c: httpx.Client, **fields) -> dict:
    r = c.post("/generate", json={"prompt": "a red cube on a table", **SMALL, **fields})
    assert r.status_code == 202, r.text
    return r.json()


def sse(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(event name, data) of each Server-Sent Event in ``lines``, as they arrive."""
    name = None
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            yield name, json.loads(line.split(":", 1)[1])
            name = None


def read_events(c: httpx.Client, url: str) -> list[tuple[str, dict]]:
    """Every event of a job's stream, up to the one that ends it."""
    with c.stream("GET", url) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return list(sse(r.iter_lines()))


def wait_first_progress(c: httpx.Client, job: dict) -> dict:
    """Follow the job's event stream until its first ``progress`` event (step 1 done); that event's data."""
    with c.stream("GET", job["events_url"]) as r:
        assert r.status_code == 200, r.read()
        for name, data in sse(r.iter_lines()):
            if name == "progress":
                return data
            assert name == "queued", f"job {job['id']} ended ({name}: {data}) before reporting a step"
    raise AssertionError(f"the event stream of job {job['id']} ended without an end event")


def start_long_job(c: httpx.Client) -> dict:
    """Submit a LONG job and return once it has finished its first step: from then on it holds the worker."""
    job = submit(c, **LONG)
    first = wait_first_progress(c, job)
    assert first["step"] == 1 and first["total"] >= MAX_STEPS - 1, first
    return job


def fetch_png(c: httpx.Client, job: dict, n: int = 0) -> bytes:
    r = c.get(job["result"]["images"][n]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return r.content


def test_generate_submit_poll_fetch(stack: Stack) -> None:
    with stack.client() as c:
        created = submit(c, seed=11, num_images=2)
        assert created["status"] == "queued"  # the row as written, before any worker saw it
        assert created["status_url"] == f"{stack.url}/jobs/{created['id']}"
        assert created["events_url"] == f"{stack.url}/jobs/{created['id']}/events"
        job = stack.wait_job(created["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["seed"] == 11 and len(job["result"]["images"]) == 2
        assert job["worker"] and job["started_at"] and job["finished_at"]
        assert job["attempts"] == 1  # ran once: the runs started are shown on the job
        assert {"queue_wait_s", "sampling_s", "encoding_s"} <= set(job["result"]["timings"])
        data = fetch_png(c, job, 1)
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == (32, 32)
        params = params_from_png(data)
        assert params["prompt"] == "a red cube on a table" and params["num_steps"] == 2
        for fmt, mime in (("webp", "image/webp"), ("jpeg", "image/jpeg")):
            r = c.get(job["result"]["images"][0]["url"], params={"format": fmt})
            assert r.status_code == 200 and r.headers["content-type"] == mime
            with Image.open(io.BytesIO(r.content)) as img:
                assert img.format == fmt.upper() and img.size == (32, 32)
        r = c.get(job["result"]["images"][0]["url"], params={"format": "gif"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "format"
        r = c.get(f"/jobs/{job['id']}/images/2")
        assert r.status_code == 404 and r.json()["error"]["param"] == "n"
        listed = c.get("/jobs", params={"status": "succeeded"}).json()
        assert job["id"] in [j["id"] for j in listed["data"]]


def test_multiref_multipart_and_json(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    with stack.client() as c:
        blocker = start_long_job(c)  # both multi-reference jobs queue behind it
        r = c.post("/multiref", data={"prompt": "put the red one on the blue one", **SMALL},
                   files=[("images", ("a.jpg", png("red", (48, 32), "JPEG"), "image/jpeg")),
                          ("images", ("b.webp", png("blue", (32, 48), "WEBP"), "image/webp"))])
        assert r.status_code == 202, r.text
        multipart_id = r.json()["id"]

        # the JSON form: checked, stored and queued, then cancelled before it runs
        body = {"prompt": "blend them", **SMALL,
                "images": [base64.b64encode(png("green")).decode(),
                           "data:image/png;base64," + base64.b64encode(png("yellow", (40, 32))).decode()]}
        r = c.post("/multiref", json=body)
        assert r.status_code == 202, r.text
        queued = c.get(f"/jobs/{r.json()['id']}").json()
        assert (queued["status"], queued["queue_position"]) == ("queued", 2)  # behind the multipart job
        assert queued["kind"] == "multiref" and queued["params"]["prompt"] == "blend them"
        assert queued["params"]["references"] == [f"uploads/{queued['id']}/0.png", f"uploads/{queued['id']}/1.png"]
        with Image.open(stack.data_dir / queued["params"]["references"][1]) as img:
            assert img.format == "PNG" and img.size == (40, 32)
        assert c.delete(f"/jobs/{queued['id']}").json()["status"] == "cancelled"
        # the blocker still held the only worker, so the cancelled job cannot have started
        assert c.get(f"/jobs/{blocker['id']}").json()["status"] == "running"
        assert c.delete(f"/jobs/{blocker['id']}").json()["status"] == "running"  # stops at its next step
        assert stack.wait_job(blocker["id"])["status"] == "cancelled"

        job = stack.wait_job(multipart_id)
        assert job["status"] == "succeeded", job
        assert job["kind"] == "multiref" and len(job["params"]["references"]) == 2
        params = params_from_png(fetch_png(c, job))
        assert params["num_references"] == 2
        # the references were stored as PNGs under the job's id, whatever format they came in
        refs = [stack.data_dir / p for p in job["params"]["references"]]
        assert [p.relative_to(stack.data_dir).as_posix() for p in refs] == [
            f"uploads/{job['id']}/0.png", f"uploads/{job['id']}/1.png"]
        with Image.open(refs[1]) as img:
            assert img.format == "PNG" and img.size == (32, 48)
        assert c.get(f"/jobs/{queued['id']}").json()["started_at"] is None

def test_events_show_every_step_then_done(stack: Stack) -> None:
    with stack.client() as c:
        created = submit(c, num_steps=6)
        events = read_events(c, created["events_url"])
    names = [n for n, _ in events]
    assert names[-1] == "done" and set(names[:-1]) <= {"queued", "progress"}
    progress = [d for n, d in events if n == "progress"]
    total = progress[0]["total"]
    assert [d["step"] for d in progress] == list(range(1, total + 1)) and total >= 5
    assert all(d["total"] == total for d in progress)
    # previews are stored every step (ECHO4O_PREVIEW_EVERY=1): the newest rides with its step
    previews = [d["preview"] for d in progress if "preview" in d]
    assert previews
    with Image.open(io.BytesIO(base64.b64decode(previews[-1]))) as img:
        assert img.format == "PNG"
    done = events[-1][1]
    assert done["id"] == created["id"] and done["status"] == "succeeded" and done["result"]["images"]


def test_cancel_a_running_and_a_queued_job(stack: Stack) -> None:
    with stack.client() as c:
        slow = start_long_job(c)
        queued = submit(c)  # the only worker is busy: this one waits
        r = c.delete(f"/jobs/{queued['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert r.json()["started_at"] is None

        # a running job is asked to stop: the answer still says running, the stream then ends with `cancelled`
        r = c.delete(f"/jobs/{slow['id']}")
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        events = read_events(c, slow["events_url"])
        assert events[-1] == ("cancelled", {"id": slow["id"]})
        assert {n for n, _ in events[:-1]} <= {"progress"}
        ended = c.get(f"/jobs/{slow['id']}").json()
        assert ended["status"] == "cancelled"
        assert 1 <= ended["progress"]["step"] < ended["progress"]["total"]
        assert ended["result"] is None

        # the worker goes on; the cancelled queued job never ran
        after = submit(c)
        assert stack.wait_job(after["id"])["status"] == "succeeded"
        never = c.get(f"/jobs/{queued['id']}").json()
        assert never["status"] == "cancelled" and never["started_at"] is None and never["worker"] is None
        # cancelling an ended job changes nothing
        assert c.delete(f"/jobs/{after['id']}").json()["status"] == "succeeded"


def test_wait_returns_the_finished_job(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post("/generate", params={"wait": 120}, json={"prompt": "a lighthouse", **SMALL})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded" and job["result"]["images"][0]["url"].endswith("/images/0")


def test_openai_client_round_trips_both_endpoints(sqlite_stack: Stack) -> None:
    from openai import OpenAI, UnprocessableEntityError

    stack = sqlite_stack
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.user_key, max_retries=0, timeout=180)
    res = client.images.generate(prompt="a watercolor fox", size="32x32", n=2,
                                 extra_body={"num_steps": 2, "seed": 5})
    assert len(res.data) == 2 and res.created > 0
    with Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))) as img:
        assert img.size == (32, 32) and params_from_png(img)["seed"] == 5

    res = client.images.generate(prompt="a watercolor fox", size="32x32", response_format="url",
                                 extra_body={"num_steps": 2})
    r = httpx.get(res.data[0].url, headers=stack.headers("user"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"

    res = client.images.edit(
        image=[("a.png", png("red"), "image/png"), ("b.png", png("blue", (48, 32)), "image/png")],
        prompt="the red square next to the blue one",
        size="32x32",
        extra_body={"num_steps": 2},
    )
    assert len(res.data) == 1
    with Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))) as img:
        assert params_from_png(img)["num_references"] == 2

    with pytest.raises(UnprocessableEntityError) as info:
        client.images.generate(prompt="x", size="33x32")
    assert info.value.body["param"] == "size"
    with pytest.raises(UnprocessableEntityError) as info:
        client.images.generate(prompt="x", n=MAX_NUM_IMAGES + 1)
    assert info.value.body["param"] == "n"


def bad_generate(limits: dict) -> list[tuple[dict, str]]:
    """Generate fields just outside the limits the gateway serves at GET /parameters, and the field at fault."""
    off_grid = limits["side_min"] + limits["side_multiple"] // 2
    too_big = limits["side_max"] + limits["side_multiple"]
    return [
        ({"height": off_grid, "width": 32}, "height"),
        ({"height": too_big, "width": too_big}, "height"),
        ({"num_steps": limits["steps_max"] + 1}, "num_steps"),
        ({"num_steps": limits["steps_min"] - 1}, "num_steps"),
        ({"cfg_text_scale": limits["scale_max"] + 1}, "cfg_text_scale"),
        ({"cfg_interval": [0.8, 0.2]}, "cfg_interval"),
        ({"timestep_shift": -1}, "timestep_shift"),
        ({"cfg_renorm_type": "banana"}, "cfg_renorm_type"),
        ({"prompt": "x" * (limits["prompt_chars_max"] + 1)}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"seed": limits["seed_max"] + 1}, "seed"),
        ({"num_images": limits["num_images_max"] + 1}, "num_images"),
        ({"priority": limits["priority_max"] + 1}, "priority"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"model_version": "no-such-model"}, "model_version"),
        ({"unknown_field": 1}, "unknown_field"),
    ]


def test_each_bad_input_is_a_4xx_naming_the_field_and_the_worker_stays_up(stack: Stack) -> None:
    with stack.client() as c:
        limits = c.get("/parameters").json()["limits"]
        jobs_before = c.get("/jobs").json()["count"]
        for fields, param in bad_generate(limits):
            r = c.post("/generate", json={"prompt": "ok", **SMALL, **fields})
            assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, (fields, r.text)
        for raw, param in ((b'{"prompt": "x", "cfg_img_scale": NaN}', "cfg_img_scale"),
                           (b'{"prompt": "x", "cfg_text_scale": 1e999}', "cfg_text_scale"),
                           (b'{"prompt": "x", "height": 32', None)):
            r = c.post("/generate", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text

        def multiref(files, **data):
            return c.post("/multiref", data={"prompt": "combine", **SMALL, **data},
                          files=[("images", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])

        bomb = io.BytesIO()
        Image.new("1", (2000, 2000)).save(bomb, format="PNG")  # 4 Mpx in a few kB: over ECHO4O_MAX_IMAGE_PIXELS
        noisy = io.BytesIO()
        Image.effect_noise((400, 400), 80).convert("RGB").save(noisy, format="PNG")  # over 256 KiB
        cases = [
            (multiref([png("red"), b"GIF89a not really"]), 415, "images.1"),
            (multiref([png("red"), png("red", fmt="GIF")]), 415, "images.1"),
            (multiref([bomb.getvalue()]), 413, "images.0"),
            (multiref([png("red"), noisy.getvalue()]), 413, "images.1"),
            (multiref([png("red")[:60]]), 422, "images.0"),
            (multiref([png("red")] * (limits["references_max"] + 1)), 422, "images"),
            (multiref([]), 422, "images"),
            (multiref([png("red")], num_steps="many"), 422, "num_steps"),
            (multiref([png("red")], references="uploads/x/0.png"), 422, "references"),
            (c.post("/multiref", json={"prompt": "x", "images": ["%%%"]}), 422, "images.0"),
            (c.post("/multiref", json={"prompt": "x"}), 422, "images"),
            (c.post("/multiref", content=b"plain", headers={"content-type": "text/plain"}), 415, None),
        ]
        for r, status, param in cases:
            assert r.status_code == status and r.json()["error"]["param"] == param, (status, param, r.text)
        # no bad request became a job, and the worker still serves
        assert c.get("/jobs").json()["count"] == jobs_before
        ok = submit(c)
        assert stack.wait_job(ok["id"])["status"] == "succeeded"
        assert c.get("/jobs").json()["count"] == jobs_before + 1
    assert httpx.get(f"{stack.url}/readyz").status_code == 200


def test_png_text_chunks_regenerate_the_same_image(stack: Stack) -> None:
    with stack.client() as c:
        first = stack.wait_job(submit(c, prompt="a blue bird on a branch", num_steps=3)["id"])
        original = fetch_png(c, first)
        params = params_from_png(original)
        again = {k: v for k, v in params.items() if k in GenerateJob.model_fields and v is not None}
        assert again["seed"] == first["result"]["seed"]
        second = stack.wait_job(c.post("/generate", json=again).json()["id"])
        assert second["status"] == "succeeded", second
        regenerated = fetch_png(c, second)
    with Image.open(io.BytesIO(original)) as a, Image.open(io.BytesIO(regenerated)) as b:
        assert a.size == b.size and a.tobytes() == b.tobytes()


def test_health_models_metrics_and_admin_views(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["workers"].startswith("ok")
    with stack.client() as c:
        models = c.get("/models").json()["data"]
        assert models[0]["id"] == stack.model.name and models[0]["workers_ready"] == 1
        stack.wait_job(submit(c)["id"])
        text = httpx.get(f"{stack.url}/metrics").text
    assert 'echo4o_jobs{status="succeeded"}' in text and "echo4o_queue_depth" in text
    count = [ln for ln in text.splitlines() if ln.startswith("echo4o_step_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1
    assert 'echo4o_http_request_duration_seconds_count{method="POST",route="/generate",status="202"}' in text
    with stack.client("admin") as admin:
        # the worker says ready once its job is done (it marks the job first, then itself): wait for that, then
        # it stays ready (a heartbeat never writes back a status read before the last change)
        deadline = time.monotonic() + WAIT_S
        while (workers := admin.get("/admin/workers").json())["data"][0]["status"] != "ready":
            assert time.monotonic() < deadline, workers
            time.sleep(POLL_S)
        assert workers["count"] == 1
        for _ in range(3):
            assert admin.get("/admin/workers").json()["data"][0]["status"] == "ready"
        assert admin.get("/admin/queue").json() == {"queued": 0, "running": 0, "data": []}
        with stack.client("user") as c:
            long = start_long_job(c)
            waiting = submit(c)
            queue = admin.get("/admin/queue").json()
            # this test's two jobs, and only them: the long one on the only worker, the other next in line
            assert (queue["running"], queue["queued"]) == (1, 1)
            assert [(j["id"], j["status"], j["queue_position"]) for j in queue["data"]] == [
                (long["id"], "running", None), (waiting["id"], "queued", 1)]
            assert c.get("/admin/workers").status_code == 403
            assert c.get("/admin/queue").status_code == 403
            for job in (waiting, long):
                c.delete(f"/jobs/{job['id']}")
        assert [stack.wait_job(j["id"])["status"] for j in (waiting, long)] == ["cancelled", "cancelled"]
