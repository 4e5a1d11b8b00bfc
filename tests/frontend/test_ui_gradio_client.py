"""The UI's generate endpoints called with gradio_client, against a live gateway + worker + tiny model."""

from __future__ import annotations

from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image

from echo4o.pnginfo import params_from_png
from frontend_gradio.examples import write_reference_examples


def _images(gallery) -> list[Path]:
    return [Path(item["image"] if isinstance(item["image"], str) else item["image"]["path"]) for item in gallery]


def test_generate_endpoint_returns_the_image_with_its_parameters(ui, ui_stack) -> None:
    client = Client(ui.url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/generate", "/multiref"}  # everything else is internal

    status, _preview, gallery, files, params, seed = client.predict(
        prompt="a lighthouse on a cliff", aspect="custom", height=64, width=96, num_steps=4, seed_mode="fixed",
        seed=123, api_name="/generate",
    )
    assert 'data-state="done"' in status, status
    assert params["seed"] == 123 == seed and params["num_steps"] == 4 and params["prompt"] == "a lighthouse on a cliff"
    (image,) = _images(gallery)
    with Image.open(image) as img:
        assert img.size == (96, 64)
    stored = params_from_png(image)  # the PNG handed out carries the generation parameters
    assert stored["seed"] == 123 and stored["height"] == 64 and stored["width"] == 96
    assert len(files) == 1

    # the job is the user's, at the gateway
    with ui_stack.client("user") as c:
        jobs = c.get("/jobs", params={"limit": 1}).json()["data"]
    assert jobs[0]["params"]["prompt"] == "a lighthouse on a cliff" and jobs[0]["status"] == "succeeded"


def test_multiref_endpoint_takes_uploaded_references(ui, tmp_path) -> None:
    refs = write_reference_examples(tmp_path)
    client = Client(ui.url, verbose=False)
    status, _preview, gallery, _files, params, _seed = client.predict(
        prompt="put the ball on the cube", references=[handle_file(str(p)) for p in refs], num_steps=3,
        api_name="/multiref",
    )
    assert 'data-state="done"' in status, status
    assert len(params["references"]) == 2
    (image,) = _images(gallery)
    with Image.open(image) as img:
        # no size given: the output follows the last (square) reference, as the engine transforms it
        assert img.width == img.height and img.width % 16 == 0


def test_gateway_error_comes_back_readable(ui) -> None:
    client = Client(ui.url, verbose=False)
    status, *_ = client.predict(prompt="   ", api_name="/generate")  # only whitespace: the gateway refuses it
    assert 'data-state="error"' in status
    assert "prompt" in status and "(field: prompt)" in status


def test_several_users_generate_at_once(ui, ui_stack) -> None:
    """While one session's job runs, another session's request reaches the gateway: the UI follows jobs
    concurrently instead of one at a time (Gradio concurrency), and the gateway queues them."""
    first, second = Client(ui.url, verbose=False), Client(ui.url, verbose=False)
    long_job = first.submit(prompt="first user: long job", aspect="1:1", num_steps=100, api_name="/generate")
    running = _wait_for_job(ui_stack, "first user: long job", ("running",))
    short_job = second.submit(prompt="second user: short job", aspect="custom", height=32, width=32, num_steps=2,
                              api_name="/generate")
    queued = _wait_for_job(ui_stack, "second user: short job", ("queued", "running", "succeeded"))
    with ui_stack.client("user") as c:
        assert c.get(f"/jobs/{running['id']}").json()["status"] == "running"  # both in flight at once
        c.delete(f"/jobs/{running['id']}")
    assert 'data-state="cancelled"' in long_job.result()[0]
    assert 'data-state="done"' in short_job.result()[0]
    assert ui_stack.wait_job(queued["id"])["status"] == "succeeded"


def _wait_for_job(stack, prompt: str, statuses: tuple[str, ...]) -> dict:
    """The newest job with this prompt once it has one of ``statuses`` (bounded by the stack's wait)."""
    import time

    deadline = time.monotonic() + 240
    with stack.client("user") as c:
        while time.monotonic() < deadline:
            for job in c.get("/jobs", params={"limit": 10}).json()["data"]:
                if job["params"]["prompt"] == prompt and job["status"] in statuses:
                    return job
            stack.check_alive()
            time.sleep(0.1)
    raise AssertionError(f"no job {prompt!r} in {statuses} within 240 s\n{stack.logs()}")
