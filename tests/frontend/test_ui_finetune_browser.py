"""The admin tab's fine-tuning section in headless Chromium, against a live gateway with a gpu worker and a
train worker (Redis broker) on the tiny model and ``echo4o ui`` started with the admin key: start a run, watch
the loss curve grow, promote the new version. Screenshots go to test-artifacts/frontend/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.frontend.conftest import UiProcess
from tests.support.stack import Stack, live_stack
from tests.support.worker_proc import WorkerProcess
from tests.worker.jobs_support import private_redis_url
from worker.training.data import TEXT_TO_IMAGE, write_test_dataset

pytestmark = pytest.mark.browser

#: Training fields the form's JSON box adds: the tiny model at 32 px, one sample per step, no warm-up.
SMALL_RUN = {"warmup_steps": 0, "expected_tokens": 1, "max_tokens": 400, "vae_min_size": 32, "vae_max_size": 32,
             "output_version": "ui-run"}
STEPS = 40


@pytest.fixture(scope="module")
def ft_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("ui-finetune")
    env = {"ECHO4O_WEIGHTS_DIR": str(root / "weights"), "ECHO4O_WORKER_HEARTBEAT_S": "1"}
    with live_stack(model=tiny_model, data_dir=root / "data", broker_url=private_redis_url(offset=13), env=env) as s:
        trainer = WorkerProcess(env=s.env, queues="train", log_path=s.data_dir / "train-worker.log",
                                database_url=s.database_url)
        s.workers.append(trainer.start())
        trainer.wait_ready()
        yield s


def plotted_points(page) -> int:
    """The points the loss plot draws (Vega's SVG line mark: one M/L command per point)."""
    return page.evaluate("""() => {
        const path = document.querySelector('#ft-loss svg .mark-line path');
        if (!path) return 0;
        return (path.getAttribute('d').match(/[ML]/g) || []).length;
    }""")


def test_start_a_run_watch_the_loss_curve_and_promote(page, ft_stack: Stack, artifacts: Path) -> None:
    dataset = write_test_dataset(ft_stack.data_dir / "datasets" / "ui", TEXT_TO_IMAGE, num_rows=2)
    with UiProcess(ft_stack.url, ft_stack.admin_key) as ui:
        page.goto(ui.url)
        page.locator("#connection").get_by_text("the UI's key: admin").wait_for()
        page.get_by_role("tab", name="Admin").click()
        page.get_by_role("tab", name="Fine-tuning and versions").click()
        page.locator("#ft-dataset").locator("textarea, input").first.fill(str(dataset))
        page.locator("#ft-mode label").filter(has_text="lora").first.click()
        page.fill("#ft-steps input", str(STEPS))
        page.locator("#ft-lr").locator("textarea, input").first.fill("2e-3")
        page.locator("#ft-extra").locator("textarea, input").first.fill(json.dumps(SMALL_RUN))
        page.click("#ft-start")

        # live: the status line counts steps with the loss, and the curve grows while the run goes on
        page.locator("#ft-status").get_by_text("loss").wait_for()
        expect(page.locator("#ft-status")).to_contain_text("step ")
        page.wait_for_function("() => { const p = document.querySelector('#ft-loss svg .mark-line path');"
                               " return p && (p.getAttribute('d').match(/[ML]/g) || []).length >= 2; }",
                               timeout=240_000)
        page.screenshot(path=str(artifacts / "admin-finetune-running.png"), full_page=True)
        page.locator("#ft-status").get_by_text("done: version").wait_for(timeout=240_000)
        assert plotted_points(page) >= 2
        ref = f"{ft_stack.model.name}/ui-run"
        expect(page.locator("#ft-status")).to_contain_text(ref)

        # the new version is listed with its manifest; promote makes it current
        page.locator("#ft-versions [role=gridcell]", has_text=ref).first.wait_for()
        expect(page.locator("#ft-manifest")).to_contain_text("finetune:")
        page.click("#ft-promote")
        expect(page.locator("#ft-versions-note")).to_contain_text(f"Current: {ref}")
        page.screenshot(path=str(artifacts / "admin-finetune-promoted.png"), full_page=True)

        # a reloaded page finds the run: its outcome and curve come back when the tab opens
        page.reload()
        page.locator("#connection").get_by_text("the UI's key: admin").wait_for()
        page.get_by_role("tab", name="Admin").click()
        page.get_by_role("tab", name="Fine-tuning and versions").click()
        expect(page.locator("#ft-status")).to_contain_text(f"done, version {ref}")
        page.wait_for_function("() => { const p = document.querySelector('#ft-loss svg .mark-line path');"
                               " return p && (p.getAttribute('d').match(/[ML]/g) || []).length >= 2; }")
    with ft_stack.client("admin") as c:
        assert c.get("/admin/models").json()["current"] == ref
