"""``GET /parameters``: needs no key, serves :func:`echo4o.jobs.parameter_spec` as is, and its limits and
defaults are the ones the gateway applies to submitted jobs (each bound accepted, one past it refused with a
422 naming the field). Real app, real Redis as the broker, no worker: accepted jobs stay queued."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.jobs import parameter_spec
from echo4o.settings import get_settings

SMALL = {"height": 32, "width": 32, "num_steps": 2}
# settings-driven limits, set away from their defaults so the test shows they are read from the settings
MAX_PROMPT_CHARS = 50
MAX_REFERENCES = 2


@dataclass
class Gateway:
    client: TestClient
    key: str
    spec: dict[str, Any]

    def generate(self, **fields: Any) -> Any:
        return self.client.post("/generate", json={"prompt": "a red cube", **SMALL, **fields},
                                headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[Gateway]:
    for name, value in {"BROKER_URL": redis_url, "MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
                        "MAX_REFERENCES": str(MAX_REFERENCES), "RATE_LIMIT_PER_MINUTE": "1000",
                        "MAX_QUEUED_JOBS_PER_KEY": "1000"}.items():
        monkeypatch.setenv(f"ECHO4O_{name}", value)
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        key = crud.create_api_key(session=s, name="user")[1]
    with TestClient(create_app(settings)) as client:
        r = client.get("/parameters")  # no key
        assert r.status_code == 200, r.text
        yield Gateway(client, key, r.json())


def refused(r: Any, param: str) -> bool:
    return r.status_code == 422 and r.json()["error"]["param"] == param


def test_served_without_a_key_exactly_as_the_core_defines_them(gateway: Gateway) -> None:
    assert gateway.spec == json.loads(json.dumps(parameter_spec()))
    limits = gateway.spec["limits"]
    assert (limits["prompt_chars_max"], limits["references_max"]) == (MAX_PROMPT_CHARS, MAX_REFERENCES)
    assert set(gateway.spec["defaults"]) == {"generate", "multiref"}
    # a wrong key is not even looked at
    r = gateway.client.get("/parameters", headers={"Authorization": "Bearer e4o_wrong"})
    assert r.status_code == 200 and r.json() == gateway.spec


def test_each_served_bound_is_accepted_and_one_past_it_refused(gateway: Gateway) -> None:
    lim = gateway.spec["limits"]
    half = lim["side_multiple"] // 2
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("num_steps", {"num_steps": lim["steps_max"]}, {"num_steps": lim["steps_max"] + 1}),
        ("num_steps", {"num_steps": lim["steps_min"]}, {"num_steps": lim["steps_min"] - 1}),
        ("height", {"height": lim["side_max"], "width": 32}, {"height": lim["side_max"] + lim["side_multiple"]}),
        ("height", {"height": lim["side_min"], "width": 32}, {"height": lim["side_min"] - lim["side_multiple"]}),
        ("height", {"height": 32 + lim["side_multiple"]}, {"height": 32 + half}),
        ("seed", {"seed": lim["seed_max"]}, {"seed": lim["seed_max"] + 1}),
        ("num_images", {"num_images": lim["num_images_max"]}, {"num_images": lim["num_images_max"] + 1}),
        ("cfg_text_scale", {"cfg_text_scale": lim["scale_max"]}, {"cfg_text_scale": lim["scale_max"] + 0.5}),
        ("cfg_img_scale", {"cfg_img_scale": lim["scale_max"]}, {"cfg_img_scale": lim["scale_max"] + 0.5}),
        ("timestep_shift", {"timestep_shift": lim["shift_max"]}, {"timestep_shift": lim["shift_max"] + 0.5}),
        ("cfg_renorm_min", {"cfg_renorm_min": lim["renorm_min_max"]},
         {"cfg_renorm_min": lim["renorm_min_max"] + 0.1}),
        ("priority", {"priority": lim["priority_max"]}, {"priority": lim["priority_max"] + 1}),
        ("prompt", {"prompt": "x" * lim["prompt_chars_max"]}, {"prompt": "x" * (lim["prompt_chars_max"] + 1)}),
    ]
    for param, ok, bad in cases:
        r = gateway.generate(**ok)
        assert r.status_code == 202, (param, ok, r.text)
        r = gateway.generate(**bad)
        assert refused(r, param), (param, bad, r.text)
    for renorm in gateway.spec["renorm_types"]:
        assert gateway.generate(cfg_renorm_type=renorm).status_code == 202, renorm
    assert refused(gateway.generate(cfg_renorm_type="banana"), "cfg_renorm_type")
    for name, (height, width) in gateway.spec["aspect_ratios"].items():
        r = gateway.generate(aspect_ratio=name, height=None, width=None)
        assert r.status_code == 202, (name, r.text)
        job = gateway.client.get(f"/jobs/{r.json()['id']}", headers={"Authorization": f"Bearer {gateway.key}"})
        assert (job.json()["params"]["height"], job.json()["params"]["width"]) == (height, width)


def test_references_max_is_the_multiref_limit(gateway: Gateway) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    n_max = gateway.spec["limits"]["references_max"]

    def multiref(n: int) -> Any:
        return gateway.client.post("/multiref", data={"prompt": "combine", **SMALL},
                                   files=[("images", (f"{i}.png", buf.getvalue(), "image/png")) for i in range(n)],
                                   headers={"Authorization": f"Bearer {gateway.key}"})

    r = multiref(n_max)
    assert r.status_code == 202, r.text
    assert refused(multiref(n_max + 1), "images")


def test_a_field_left_out_gets_the_served_default(gateway: Gateway) -> None:
    """The defaults the gateway itself records; the guidance ones (cfg_*) stay null in the job and the engine
    applies the mode's value, so they are checked by the engine's tests, not here."""
    defaults = gateway.spec["defaults"]["generate"]
    r = gateway.client.post("/generate", json={"prompt": "a red cube"},
                            headers={"Authorization": f"Bearer {gateway.key}"})
    assert r.status_code == 202, r.text
    job = gateway.client.get(f"/jobs/{r.json()['id']}", headers={"Authorization": f"Bearer {gateway.key}"}).json()
    recorded = {k: job["params"][k] for k in ("num_steps", "timestep_shift", "cfg_renorm_min", "num_images",
                                              "priority")}
    assert recorded == {k: defaults[k] for k in recorded}
    assert all(job["params"][k] is None for k in ("cfg_text_scale", "cfg_img_scale", "cfg_interval",
                                                  "cfg_renorm_type"))
