"""The admin tab's benchmark section in headless Chromium: start a run (tiny model, one prompt, 32 px, the local
judge), follow it to the end, see its report, compare it, and open it again by id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.evaluation.servers import judge_server
from tests.frontend.test_ui_browser import admin_tab, open_ui

pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 240_000


def test_start_a_benchmark_run_and_open_its_report(page, ui, ui_stack, artifacts: Path) -> None:
    prompts = ui_stack.data_dir / "bench-ui" / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(json.dumps({"prompt": "a cat", "include": [{"class": "cat", "count": 1}]}) + "\n"
                       + json.dumps({"prompt": "a dog", "include": [{"class": "dog", "count": 1}]}) + "\n")
    with judge_server() as (judge_url, judge_log):
        open_ui(page, ui)
        page.get_by_text("Connection", exact=True).click()
        page.fill("#api-key input", ui_stack.admin_key)
        page.click("#api-key-apply")
        admin_tab(page).wait_for()
        admin_tab(page).click()
        page.get_by_role("tab", name="Benchmarks").click()

        # picked from the open list, then checked: typing and Enter raced the list's filtering under load, and the
        # form kept its default suite
        suite = page.locator("#bench-suite input")
        suite.click()
        page.get_by_role("option", name="custom", exact=True).click()
        expect(suite).to_have_value("custom")
        page.fill("#bench-prompts textarea", "bench-ui/prompts.jsonl")
        page.fill("#bench-size input", "32")
        page.fill("#bench-steps input", "3")
        page.fill("#bench-judge-url textarea", judge_url)
        page.fill("#bench-judge-model textarea", "judge-m")
        page.click("#bench-start")

        # limit 1 (the form's default): one prompt of the group; followed live until it ends
        page.locator("#bench-progress").get_by_text("succeeded").wait_for(timeout=RUN_TIMEOUT_MS)
        report = page.frame_locator("#bench-report-frame")
        report.get_by_role("heading", name="Custom benchmark").wait_for()
        report.get_by_text("overall: 1.000").wait_for()
        report.locator("img[alt='0001_0']").wait_for()
        page.screenshot(path=str(artifacts / "admin-benchmark-report.png"), full_page=True)
    assert len(judge_log.requests) == 1

    run_id = page.locator("#bench-run-id textarea").input_value()
    with ui_stack.client("admin") as c:
        run = c.get(f"/admin/benchmarks/{run_id}").json()
    assert run["status"] == "succeeded" and run["limit"] == 1 and run["image_jobs"] == {"succeeded": 1}

    # the compare view: the run against itself, group by group
    page.fill("#bench-compare-a textarea", run_id)
    page.fill("#bench-compare-b textarea", run_id)
    page.click("#bench-compare")
    page.locator("#bench-comparison").get_by_text("+0.000").first.wait_for()

    # opened again by id from a fresh page
    page.reload()
    page.get_by_text("Connection", exact=True).click()
    page.fill("#api-key input", ui_stack.admin_key)
    page.click("#api-key-apply")
    admin_tab(page).click()
    page.get_by_role("tab", name="Benchmarks").click()
    page.fill("#bench-run-id textarea", run_id)
    page.click("#bench-open")
    page.frame_locator("#bench-report-frame").get_by_text("overall: 1.000").wait_for()
