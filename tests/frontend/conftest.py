"""Fixtures for the demo UI's tests: the UI as a real ``echo4o ui`` subprocess, headless Chromium (Debian's
``chromium`` driven by Playwright) and the folder where screenshots are kept (``test-artifacts/frontend``)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "frontend"
CHROMIUM = os.environ.get("ECHO4O_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiProcess:
    """``echo4o ui`` in a subprocess on a free port; ``url`` once it answers."""

    def __init__(self, api_url: str, api_key: str | None = None, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = [sys.executable, "-m", "echo4o", "ui", "--api", api_url, "--port", str(self.port)]
        if api_key:
            self.args += ["--api-key", api_key]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        fd, name = tempfile.mkstemp(prefix="echo4o-ui-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> UiProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO_ROOT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.__exit__()
                pytest.fail(f"echo4o ui exited with code {self.proc.returncode}; log:\n{self.tail()}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                pytest.fail(f"echo4o ui did not answer on {self.url} within 120 s; log:\n{self.tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.3)  # between tries: returns at once if the UI exits (checked above)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """One headless Chromium for the session (Playwright, Debian's binary; never `playwright install`)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/ensure-test-deps.sh` (as root: apt-get install -y "
                    "chromium), or point ECHO4O_TEST_CHROMIUM at a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, request: pytest.FixtureRequest, artifacts: Path):
    """A fresh browser page (own session); a screenshot of the end state is kept when the test fails."""
    failed_shot = artifacts / f"FAILED-{request.node.name}.png"
    failed_shot.unlink(missing_ok=True)  # from an earlier run
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        pg.screenshot(path=str(failed_shot), full_page=True)
    context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def ui_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A live gateway with its embedded worker on the tiny model (previews every step), shared by the UI tests."""
    from tests.support.stack import live_stack

    with live_stack(model=tiny_model, data_dir=tmp_path_factory.mktemp("ui-stack"),
                    env={"ECHO4O_PREVIEW_EVERY": "1"}) as stack:
        yield stack


@pytest.fixture(scope="session")
def ui(ui_stack) -> Iterator[UiProcess]:
    """``echo4o ui`` started with the stack's *user* key."""
    with UiProcess(ui_stack.url, ui_stack.user_key) as proc:
        yield proc


@pytest.fixture(scope="session")
def parameters() -> dict:
    """``GET /parameters`` of a real gateway app (in process; the route needs no database or broker)."""
    from fastapi.testclient import TestClient

    from backend.app import create_app

    resp = TestClient(create_app()).get("/parameters")
    assert resp.status_code == 200, resp.text
    return resp.json()

