"""`echo4o serve` on a machine with no Redis: the gateway starts its own worker child on the embedded broker
(SQLite files in the data dir) and generates an image end to end; `echo4o keys` manages the keys it checks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from echo4o.pnginfo import params_from_png
from tests.support.stack import live_stack


def test_embedded_serve_generates_end_to_end_without_redis(tiny_model: Path, tmp_path: Path) -> None:
    with live_stack(model=tiny_model, data_dir=tmp_path / "data", broker_url=None) as stack:
        assert "ECHO4O_BROKER_URL" not in stack.env
        assert not stack.workers  # the gateway started the worker itself
        with stack.client() as c:
            r = c.post("/generate", params={"wait": 240},
                       json={"prompt": "a small house", "height": 32, "width": 32, "num_steps": 2, "seed": 3})
            assert r.status_code == 200, r.text
            job = r.json()
            assert job["status"] == "succeeded"
            image = c.get(job["result"]["images"][0]["url"])
        assert image.status_code == 200
        with stack.client("admin") as admin:
            (worker,) = admin.get("/admin/workers").json()["data"]
        assert worker["queues"] == "gpu,train"  # the only worker takes fine-tuning jobs too
        with Image.open(io.BytesIO(image.content)) as img:
            assert img.size == (32, 32) and params_from_png(img)["seed"] == 3
        assert (stack.data_dir / "broker.sqlite").is_file()
        assert (stack.data_dir / f"results/{job['id']}/0.png").is_file()
        gateway = stack.gateway
    # stopping the gateway stops its worker
    assert gateway.returncode is not None
    log = (tmp_path / "data" / "gateway.log").read_text()
    assert "embedded worker started" in log and "embedded worker stopped" in log


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "ECHO4O_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "echo4o", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    made = run_cli("keys", "create", "--admin", "--name", "ops", data_dir=tmp_path)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("e4o_") and "not shown again" in made.stderr

    listed = run_cli("keys", "list", "--json", data_dir=tmp_path)
    (row,) = json.loads(listed.stdout)
    assert row["name"] == "ops" and row["admin"] is True and key.startswith(row["prefix"])
    assert key not in listed.stdout  # only the prefix is ever shown

    revoked = run_cli("keys", "revoke", row["id"], data_dir=tmp_path)
    assert revoked.returncode == 0 and row["id"] in revoked.stdout
    again = run_cli("keys", "revoke", row["id"], data_dir=tmp_path)
    assert again.returncode == 1 and "echo4o keys list" in again.stderr
    assert json.loads(run_cli("keys", "list", "--json", data_dir=tmp_path).stdout) == []
    # the records no longer accept it (the gateway's check)
    from echo4o.db import crud, session_scope

    with session_scope(f"sqlite:///{tmp_path / 'echo4o.db'}") as s:
        assert crud.verify_api_key(session=s, key=key) is None
