"""The gateway imports nothing of ``worker/`` and never torch, also not while it serves requests (it runs on
machines with no GPU and must start fast). What it shares with the worker (settings, the job contract, SQL
records, the enqueue client) lives in the torch-free core ``echo4o/``, which in turn imports neither side
(its CLI, the composition root, excepted)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``path``, at any depth (function-local imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import stays inside its own package
                continue
            module = node.module or ""
            # `from worker import queue` imports worker.queue: name both
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def forbidden_imports(folder: Path, forbidden: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> list[str]:
    hits = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(skip):
            continue
        for line, module in imported_modules(path):
            if module in forbidden or module.startswith(tuple(f"{name}." for name in forbidden)):
                hits.append(f"{rel}:{line} imports {module}")
    return hits


def test_the_import_scanner_finds_every_form_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent(
        """
        import worker.tasks
        from worker import queue
        from .worker import nothing
        def later():
            import torch
            importlib.import_module("worker.engine")
        """
    ))
    assert [m for _, m in imported_modules(sample)] == [
        "worker.tasks", "worker", "worker.queue", "torch", "worker.engine"]


@pytest.mark.parametrize(
    ("folder", "forbidden", "skip"),
    [
        ("backend", ("worker", "torch", "diffusers"), ()),
        ("echo4o", ("worker", "backend", "frontend_gradio", "torch"), ("echo4o/cli/",)),
    ],
    ids=["gateway", "core"],
)
def test_no_import_of_a_layer_above(folder: str, forbidden: tuple[str, ...], skip: tuple[str, ...]) -> None:
    hits = forbidden_imports(ROOT / folder, forbidden, skip=skip)
    assert not hits, "move what both sides need into echo4o/ and import it from there:\n" + "\n".join(hits)


def test_serving_requests_imports_neither_worker_nor_torch(tmp_path: Path, redis_url: str) -> None:
    script = textwrap.dedent(
        """
        import sys
        from fastapi.testclient import TestClient
        from backend.app import create_app
        from echo4o.db import crud, session_scope, upgrade_to_head
        from echo4o.settings import get_settings

        upgrade_to_head(get_settings().database_url)
        with session_scope() as s:
            key = crud.create_api_key(session=s, name="t")[1]
        with TestClient(create_app()) as c:
            h = {"Authorization": f"Bearer {key}"}
            job = c.post("/generate", json={"prompt": "x", "height": 32, "width": 32, "num_steps": 2}, headers=h)
            assert job.status_code == 202, job.text
            assert c.get(f"/jobs/{job.json()['id']}", headers=h).status_code == 200
            assert c.delete(f"/jobs/{job.json()['id']}", headers=h).json()["status"] == "cancelled"
            assert c.get("/parameters").status_code == 200
            assert c.get("/metrics").status_code == 200
            assert c.get("/openapi.json").status_code == 200
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("worker", "torch", "diffusers"))
        assert "echo4o.queue" in sys.modules, "the request did not go through the enqueue client"
        print("IMPORTED:", loaded)
        """
    )
    env = {"PATH": "/usr/bin:/bin", "ECHO4O_DATA_DIR": str(tmp_path), "ECHO4O_BROKER_URL": redis_url}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED: []" in proc.stdout, proc.stdout
