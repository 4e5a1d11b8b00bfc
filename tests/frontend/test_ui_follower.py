"""The job follower against a live gateway + worker + tiny model: the named updates it yields for a job that
succeeds, one the gateway refuses, and one cancelled before and while it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from echo4o.pnginfo import params_from_png
from frontend_gradio.client import GatewayClient
from frontend_gradio.follower import KEEP, JobFollower, JobUpdate, decode_preview
from frontend_gradio.results import ResultCache
from tests.frontend.ui_support import long_job_fields


@pytest.fixture
def follower(ui_stack, tmp_path: Path):
    client = GatewayClient(ui_stack.url, ui_stack.user_key)
    yield JobFollower(client, ResultCache(client, tmp_path))
    client.close()


def _request(**fields) -> dict:
    """A generate request body: the aspect name of ``long_job_fields`` becomes ``aspect_ratio``."""
    if "aspect" in fields:
        fields["aspect_ratio"] = fields.pop("aspect")
    return fields


def test_a_job_that_succeeds(follower: JobFollower) -> None:
    body = {"prompt": "follower: a small job", "height": 32, "width": 48, "num_steps": 3, "seed": 11}
    updates = list(follower.follow("s1", "generate", None, lambda: follower.client.submit_generate(body)))

    first, *middle, last = updates
    assert (first.state, first.preview, first.gallery, first.files, first.params) == ("submitting", None, [], None,
                                                                                     None)
    assert [u.final for u in updates] == [False] * (len(updates) - 1) + [True]
    job_id = last.job_id
    assert middle[0].state == "queued" and all(u.job_id == job_id for u in middle)
    running = [u for u in middle if u.state == "running"]
    assert running and all(u.total and 0 <= u.step <= u.total for u in running)
    assert any(isinstance(u.preview, Image.Image) for u in running)  # ECHO4O_PREVIEW_EVERY=1 in the stack
    assert all(u.gallery is KEEP and u.seed is KEEP for u in middle)

    assert last.state == "done" and last.seed == 11 and last.preview is None
    assert last.params["prompt"] == body["prompt"] and last.params["seed"] == 11
    (path,) = last.files
    assert last.gallery == [(path, "seed 11 · #0")] and Path(path).parent.name == job_id
    with Image.open(path) as img:
        assert img.size == (48, 32)
    assert params_from_png(Path(path))["seed"] == 11
    assert 'data-state="done"' in last.status_html() and job_id[:12] in last.status_html()


def test_a_refused_request_ends_in_one_error_update(follower: JobFollower) -> None:
    updates = list(follower.follow("s2", "generate", None,
                                   lambda: follower.client.submit_generate({"prompt": "   "})))
    assert [u.state for u in updates] == ["submitting", "error"]
    error = updates[-1]
    assert error.final and "(field: prompt)" in error.text and error.warning == error.text
    assert follower.cancel("s2", "generate") is None  # the follower let go of it


def test_cancel_while_submitting_cancels_once_the_job_exists(follower: JobFollower, ui_stack, parameters) -> None:
    """Cancel pressed before the gateway answered: the follower cancels the job as soon as it has its id."""
    body = _request(prompt="follower: cancelled while submitting", **long_job_fields(parameters))
    said: list[JobUpdate | None] = []

    def submit() -> dict:
        said.append(follower.cancel("s3", "generate"))  # the job is not created yet
        return follower.client.submit_generate(body)

    updates = list(follower.follow("s3", "generate", None, submit))
    assert said[0] is not None and said[0].state == "submitting" and "as soon as" in said[0].text
    assert updates[-1].state == "cancelled" and updates[-1].final
    assert ui_stack.wait_job(updates[-1].job_id)["status"] == "cancelled"


def test_cancel_while_running_stops_the_job_mid_run(follower: JobFollower, ui_stack, parameters) -> None:
    body = _request(prompt="follower: cancelled while running", **long_job_fields(parameters))
    follow = follower.follow("s4", "generate", None, lambda: follower.client.submit_generate(body))
    for update in follow:  # up to the first progress event: the job is running
        assert not update.final, update
        if update.state == "running":
            break
    said = follower.cancel("s4", "generate")
    assert said is not None and said.state in ("running", "cancelled") and said.job_id == update.job_id
    rest = list(follow)
    assert rest[-1].state == "cancelled" and rest[-1].job_id == update.job_id

    job = ui_stack.wait_job(update.job_id)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < job["progress"]["total"]


def test_a_broken_preview_is_dropped() -> None:
    assert decode_preview("data:image/png;base64,bm90IGFuIGltYWdl") is None
    assert decode_preview(None) is None


def test_an_update_refuses_an_unknown_state() -> None:
    with pytest.raises(ValueError, match="state must be one of"):
        JobUpdate("almost done", "x")
