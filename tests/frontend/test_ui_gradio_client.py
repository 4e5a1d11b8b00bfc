"""The UI's generate endpoints called with gradio_client, against a live gateway + worker + tiny model."""

from __future__ import annotations

import re
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image

from echo4o.pnginfo import params_from_png
from frontend_gradio.examples import write_reference_examples
from tests.frontend.ui_support import long_job_fields


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


def test_several_users_generate_at_once(ui, ui_stack, parameters) -> None:
    """While one session's job runs, another session's request reaches the gateway: the UI follows jobs
    concurrently instead of one at a time (Gradio concurrency), and the gateway queues them."""
    first, second = Client(ui.url, verbose=False), Client(ui.url, verbose=False)
    long_job = first.submit(prompt="first user: long job", **long_job_fields(parameters), api_name="/generate")
    running_id = _job_id_once(long_job, ui_stack, 'data-state="running" data-step=')  # its first progress
    short_job = second.submit(prompt="second user: short job", aspect="custom", height=32, width=32, num_steps=2,
                              api_name="/generate")
    short_id = _job_id_once(short_job, ui_stack, 'data-state="queued"')  # the gateway has it
    with ui_stack.client("user") as c:
        assert c.get(f"/jobs/{running_id}").json()["status"] == "running"  # both in flight at once
        c.delete(f"/jobs/{running_id}")
    assert 'data-state="cancelled"' in long_job.result()[0]
    assert 'data-state="done"' in short_job.result()[0]
    assert ui_stack.wait_job(short_id)["status"] == "succeeded"


def _job_id_once(job, stack, marker: str) -> str:
    """Read the UI's streamed answers of a gradio_client ``job`` until its status box contains ``marker``;
    the id of the gateway job it shows (the box shows the id's first 12 characters)."""
    for status, *_ in job:
        if marker in status:
            prefix = re.search(r'class="e4o-job">job ([^<]+)<', status).group(1)
            with stack.client("user") as c:
                ids = [j["id"] for j in c.get("/jobs", params={"limit": 20}).json()["data"]]
            (job_id,) = [i for i in ids if i.startswith(prefix)]
            return job_id
        assert 'data-state="error"' not in status and 'data-state="failed"' not in status, status
    raise AssertionError(f"the UI's answers ended without {marker!r}\n{stack.logs()}")
