"""The gateway never imports torch or the engine, also not while it serves requests (it runs on machines
with no GPU and must start fast)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_serving_requests_imports_neither_torch_nor_the_engine(tmp_path: Path, redis_url: str) -> None:
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
            assert c.get("/metrics").status_code == 200
            assert c.get("/openapi.json").status_code == 200
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "worker.engine", "diffusers")))
        print("IMPORTED:", bad)
        """
    )
    env = {"PATH": "/usr/bin:/bin", "ECHO4O_DATA_DIR": str(tmp_path), "ECHO4O_BROKER_URL": redis_url}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED: []" in proc.stdout, proc.stdout
