"""The demo in headless Chromium against a live gateway + worker + tiny model + ``echo4o ui`` (started with a
user key). Screenshots of each end state are kept in test-artifacts/frontend/."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from echo4o.pnginfo import params_from_png
from frontend_gradio.examples import write_reference_examples
from tests.frontend.ui_support import long_job_fields

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 240_000


def open_ui(page, ui) -> None:
    page.goto(ui.url)
    page.wait_for_selector("#t2i-prompt textarea")
    page.locator("#connection").get_by_text("reachable").wait_for()


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id} label").filter(has_text=label).first.click()


def cell(page, elem_id: str, text: str):
    """A visible cell of a Gradio dataframe (its hidden sizing copy also holds the text)."""
    return page.locator(f"#{elem_id} [role=gridcell]", has_text=text).first


def admin_tab(page):
    return page.get_by_role("tab", name="Admin")


def latest_job(stack, key: str = "user") -> dict:
    with stack.client(key) as c:
        return c.get("/jobs", params={"limit": 1}).json()["data"][0]


def test_text_to_image_then_history_and_reuse(page, ui, ui_stack, artifacts: Path) -> None:
    open_ui(page, ui)
    page.fill("#t2i-prompt textarea", "a paper boat on a puddle")
    choose(page, "t2i-aspect", "custom")
    set_slider(page, "t2i-height", 64)
    set_slider(page, "t2i-width", 128)
    set_slider(page, "t2i-steps", 5)
    page.click("#t2i-generate")
    page.wait_for_selector("#t2i-status [data-state=done]", timeout=JOB_TIMEOUT_MS)
    page.locator("#t2i-gallery img").first.wait_for()
    page.screenshot(path=str(artifacts / "t2i-done.png"), full_page=True)

    job = latest_job(ui_stack)
    assert job["status"] == "succeeded" and job["params"]["prompt"] == "a paper boat on a puddle"
    assert (job["params"]["height"], job["params"]["width"], job["params"]["num_steps"]) == (64, 128, 5)
    assert job["id"][:12] in page.inner_text("#t2i-status")

    # the download link hands out the PNG with its parameters
    with page.expect_download() as dl:
        page.locator("#t2i-files a").first.click()
    png = Path(dl.value.path())
    assert params_from_png(png)["prompt"] == "a paper boat on a puddle"

    # history lists it; reuse puts the parameters back into the text-to-image tab
    page.fill("#t2i-prompt textarea", "something else")
    set_slider(page, "t2i-height", 256)
    page.get_by_role("tab", name="History").click()
    row = cell(page, "history-table", "a paper boat on a puddle")
    row.wait_for()
    row.click()
    page.locator("#history-gallery img").first.wait_for()
    page.screenshot(path=str(artifacts / "history.png"), full_page=True)
    page.click("#history-reuse")
    page.wait_for_function("document.querySelector('#t2i-prompt textarea').value === 'a paper boat on a puddle'")
    assert page.locator("#t2i-seed input").input_value() == str(job["result"]["seed"])
    assert page.locator("#t2i-height input[type=number]").input_value() == "64"


def test_multi_reference_with_two_uploads(page, ui, ui_stack, artifacts: Path, tmp_path: Path) -> None:
    refs = write_reference_examples(tmp_path)  # drawn now with Pillow
    open_ui(page, ui)
    page.get_by_role("tab", name="Multi-reference").click()
    page.locator("#mr-references input[type=file]").set_input_files([str(p) for p in refs])
    page.locator("#mr-ref-gallery img").nth(1).wait_for()  # both shown, in order
    page.fill("#mr-prompt textarea", "put the red ball on the blue cube")
    set_slider(page, "mr-steps", 3)
    page.click("#mr-generate")
    page.wait_for_selector("#mr-status [data-state=done]", timeout=JOB_TIMEOUT_MS)
    page.locator("#mr-gallery img").first.wait_for()
    assert page.locator("#mr-ref-gallery img").count() == 2  # the references stay beside the result
    page.screenshot(path=str(artifacts / "multiref-done.png"), full_page=True)

    job = latest_job(ui_stack)
    assert job["kind"] == "multiref" and job["status"] == "succeeded"
    assert len(job["params"]["references"]) == 2


def test_cancel_a_running_job(page, ui, ui_stack, parameters, artifacts: Path) -> None:
    long = long_job_fields(parameters)  # the longest job allowed: the cancel lands mid-run even on a fast machine
    open_ui(page, ui)
    page.fill("#t2i-prompt textarea", "a long job to cancel")
    choose(page, "t2i-aspect", long["aspect"])
    set_slider(page, "t2i-steps", long["num_steps"])
    set_slider(page, "t2i-num-images", long["num_images"])
    page.click("#t2i-generate")
    # the first progress event, as the page shows it (step counter and bar)
    page.wait_for_selector("#t2i-status [data-state=running][data-step]", timeout=JOB_TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "cancel-running.png"), full_page=True)
    page.click("#t2i-cancel")
    page.wait_for_selector("#t2i-status [data-state=cancelled]", timeout=JOB_TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "cancel-done.png"), full_page=True)

    job = ui_stack.wait_job(latest_job(ui_stack)["id"])
    assert job["params"]["prompt"] == "a long job to cancel" and job["status"] == "cancelled"
    assert (job["params"]["num_steps"], job["params"]["num_images"]) == (long["num_steps"], long["num_images"])
    assert job["progress"]["step"] < job["progress"]["total"]


def test_admin_tab_only_with_an_admin_key(page, ui, ui_stack, artifacts: Path) -> None:
    # its own precondition: a finished job of the user, which the admin's "All jobs" must list
    with ui_stack.client("user") as c:
        resp = c.post("/generate", json={"prompt": "a job for the admin to see", "height": 32, "width": 32,
                                         "num_steps": 2})
    assert resp.status_code == 202, resp.text
    job = ui_stack.wait_job(resp.json()["id"])
    assert job["status"] == "succeeded", job

    open_ui(page, ui)
    page.locator("#connection").get_by_text("the UI's key: user").wait_for()
    expect(admin_tab(page)).to_have_count(0)  # retries: the tab's visibility is its own UI update
    page.screenshot(path=str(artifacts / "user-key-no-admin-tab.png"), full_page=True)

    page.get_by_text("Connection", exact=True).click()
    page.fill("#api-key input", ui_stack.admin_key)
    page.click("#api-key-apply")
    admin_tab(page).wait_for()
    admin_tab(page).click()
    cell(page, "admin-workers", "ready").wait_for()
    page.get_by_role("tab", name="All jobs").click()
    cell(page, "admin-jobs", job["id"][:12]).wait_for()  # every user's jobs, this one among them
    page.get_by_role("tab", name="Workers, queue and models").click()
    page.screenshot(path=str(artifacts / "admin-key-admin-tab.png"), full_page=True)

    # back to a user key: the tab goes away again
    page.fill("#api-key input", ui_stack.other_key)
    page.click("#api-key-apply")
    page.locator("#connection").get_by_text("your key: user").wait_for()
    expect(admin_tab(page)).to_have_count(0)


def test_gateway_errors_are_readable(page, ui, artifacts: Path) -> None:
    open_ui(page, ui)
    page.get_by_text("Connection", exact=True).click()
    page.fill("#api-key input", "e4o_not_a_real_key")
    page.click("#api-key-apply")
    page.locator("#connection").get_by_text("key not accepted").wait_for()
    page.fill("#t2i-prompt textarea", "anything")
    page.click("#t2i-generate")
    status = page.locator("#t2i-status [data-state=error]")
    status.wait_for()
    text = status.inner_text()
    assert "echo4o keys create" in text and "{" not in text  # a sentence, not a JSON dump
    page.screenshot(path=str(artifacts / "error-bad-key.png"), full_page=True)
