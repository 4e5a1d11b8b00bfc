"""Security properties of the gateway, on the real app (in-process, real Redis broker, real SQLite):

* every admin route refuses a user key (403) and no key (401): the routes are enumerated from the app, so a new
  one is checked without editing this file, and the check is shown to catch a route that lacks the admin
  dependency;
* keys are stored hashed; no key or webhook secret reaches the log;
* CORS headers go to configured origins only;
* uploads are stored under names the gateway chose, never the client's;
* one user key's jobs (row, result images, event stream with its previews, cancel) do not exist for another
  (404, the same answer as an unknown id).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from backend.api.deps import CurrentKey, get_admin_key
from backend.app import create_app
from echo4o.db import crud, get_engine, session_scope, upgrade_to_head
from echo4o.logging import _Formatter
from echo4o.settings import get_settings

JOB = {"prompt": "a red cube", "height": 32, "width": 32, "num_steps": 2}


@dataclass
class Gateway:
    client: TestClient
    app: FastAPI
    admin: str
    user: str
    other: str
    database_url: str

    def h(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture
def make_gateway(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[Callable[..., Gateway]]:
    clients: list[TestClient] = []

    def make(**env: str) -> Gateway:
        monkeypatch.setenv("ECHO4O_BROKER_URL", redis_url)
        for k, v in env.items():
            monkeypatch.setenv(f"ECHO4O_{k.upper()}", v)
        get_settings.cache_clear()
        settings = get_settings()
        upgrade_to_head(settings.database_url)
        with session_scope(settings.database_url) as s:
            keys = [crud.create_api_key(session=s, name=n, is_admin=(n == "admin"))[1]
                    for n in ("admin", "user", "other")]
        app = create_app(settings)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return Gateway(client, app, *keys, settings.database_url)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


# --- admin routes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    dependant: Any


def app_routes(app: FastAPI) -> list[Route]:
    """Every API route of ``app`` with its full path, routers included (FastAPI keeps included routers as
    branches of ``app.routes`` from 0.16x on; ``iter_route_contexts`` flattens them, as the OpenAPI spec does)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is flat
        return [Route(r.path, frozenset(r.methods), r.dependant) for r in app.routes if isinstance(r, APIRoute)]
    out = []
    for ctx in iter_route_contexts(app.routes):
        dependant = getattr(ctx, "dependant", None)
        if dependant is not None and ctx.path and ctx.methods:
            out.append(Route(ctx.path, frozenset(ctx.methods), dependant))
    return out


def _dependency_calls(route: Route) -> set[Callable[..., Any]]:
    seen: set[Callable[..., Any]] = set()
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if dep.call is not None:
            seen.add(dep.call)
        stack.extend(dep.dependencies)
    return seen


def admin_routes(app: FastAPI) -> list[Route]:
    """Routes that are admin by their path (``/admin...``) or by their dependency (``AdminKey``)."""
    return [r for r in app_routes(app)
            if r.path == "/admin" or r.path.startswith("/admin/") or get_admin_key in _dependency_calls(r)]


def _concrete(path: str) -> str:
    """A callable path for a route template: every ``{param}`` (``{ref:path}`` too) becomes a plain value."""
    return re.sub(r"\{[^}]+\}", "0", path)


def admin_violations(app: FastAPI, client: TestClient, user_key: str) -> list[str]:
    """What is wrong with the admin routes of ``app``: a route without the admin dependency, or one that does
    not answer 401 without a key and 403 with a user key (for every method it has)."""
    problems = []
    for route in admin_routes(app):
        if get_admin_key not in _dependency_calls(route):
            problems.append(f"{sorted(route.methods)} {route.path}: no AdminKey dependency")
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            url = _concrete(route.path)
            body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            for headers, want in (({}, 401), ({"Authorization": f"Bearer {user_key}"}, 403)):
                r = client.request(method, url, headers=headers, **body)
                if r.status_code != want:
                    problems.append(f"{method} {route.path}: {r.status_code} with "
                                    f"{'a user key' if headers else 'no key'}, {want} expected")
    return problems


ADMIN_ROUTES_AT_LEAST = 12  # workers, queue, models (3), benchmarks (6), finetune: the enumeration must see them


def test_every_admin_route_refuses_user_keys_and_anonymous_callers(make_gateway) -> None:
    gw = make_gateway()
    routes = admin_routes(gw.app)
    assert len(routes) >= ADMIN_ROUTES_AT_LEAST, [r.path for r in routes]
    assert {"/admin/workers", "/admin/queue", "/admin/finetune", "/admin/benchmarks", "/admin/models"} <= {
        r.path for r in routes}
    assert admin_violations(gw.app, gw.client, gw.user) == []
    # the admin key gets past the check on every one (whatever the route then answers)
    for route in routes:
        for method in route.methods - {"HEAD", "OPTIONS"}:
            body = {"json": {}} if method == "POST" else {}
            r = gw.client.request(method, _concrete(route.path), headers=gw.h(gw.admin), **body)
            assert r.status_code not in (401, 403), (method, route.path, r.text)


def test_the_admin_check_catches_a_route_without_the_admin_dependency(make_gateway) -> None:
    gw = make_gateway()
    leak = APIRouter(prefix="/admin")

    @leak.get("/leak")
    def leaky(principal: CurrentKey) -> dict[str, str]:  # a key, but not an admin one: the mistake to catch
        return {"secret": "everything"}

    @leak.post("/open/{thing}")
    def open_route(thing: str) -> dict[str, str]:  # no key at all
        return {"thing": thing}

    gw.app.include_router(leak)
    problems = admin_violations(gw.app, gw.client, gw.user)
    assert any(p.startswith("['GET'] /admin/leak: no AdminKey dependency") for p in problems), problems
    assert "GET /admin/leak: 200 with a user key, 403 expected" in problems
    assert "POST /admin/open/{thing}: 200 with no key, 401 expected" in problems
    assert all("/leak" in p or "/open/" in p for p in problems), problems  # the real routes stay clean


# --- keys and secrets --------------------------------------------------------------------------------------
class _Capture(logging.Handler):
    """Every log record of the process, formatted as the gateway writes them (fields included)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(_Formatter("json"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    root = logging.getLogger()
    handler, level = _Capture(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_keys_are_stored_hashed_and_no_secret_is_logged(make_gateway, captured_logs: _Capture) -> None:
    from tests.backend.test_webhooks import Receiver

    receiver = Receiver()
    try:
        gw = make_gateway(webhook_allow_private="true", webhook_poll_s="0.05")
        with session_scope(gw.database_url) as s:
            extra = crud.create_api_key(session=s, name="extra")[1]
        keys = [gw.admin, gw.user, gw.other, extra]

        # the database holds each key's SHA-256 and an 8-character display prefix, never the key
        with get_engine(gw.database_url).connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM api_keys"))]
        stored = {r["key_hash"] for r in rows}
        assert stored == {hashlib.sha256(k.encode()).hexdigest() for k in keys}
        dump = repr(rows)
        assert not any(k in dump for k in keys)
        assert all(len(r["prefix"]) <= 8 for r in rows)

        # use every key, good and bad ways, and fetch, rotate and use a webhook secret
        for key in keys:
            assert gw.client.get("/jobs", headers=gw.h(key)).status_code == 200
            assert gw.client.get("/jobs", headers={"X-API-Key": key}).status_code == 200
            assert gw.client.get("/jobs", headers={"Authorization": f"Basic {key}"}).status_code == 401
            assert gw.client.get("/jobs", headers=gw.h(key + "x")).status_code == 401
        assert gw.client.get("/admin/queue", headers=gw.h(gw.user)).status_code == 403
        secrets = [gw.client.get("/keys/webhook-secret", headers=gw.h(gw.user)).json()["secret"],
                   gw.client.post("/keys/webhook-secret", headers=gw.h(gw.user)).json()["secret"]]
        job = gw.client.post("/generate", json={**JOB, "webhook_url": receiver.url}, headers=gw.h(gw.user)).json()
        assert gw.client.delete(f"/jobs/{job['id']}", headers=gw.h(gw.user)).status_code == 200
        receiver.wait(1)
        deadline = time.monotonic() + 30
        while not any("webhook delivered" in line for line in captured_logs.lines):  # logged after the answer
            assert time.monotonic() < deadline, "the dispatcher never logged the delivery"
            time.sleep(0.02)
        with session_scope(gw.database_url) as s:
            (row,) = [k for k in crud.list_api_keys(session=s) if k.name == "extra"]
            crud.revoke_api_key(session=s, key_id=row.id)
        assert gw.client.get("/jobs", headers=gw.h(extra)).status_code == 401
    finally:
        receiver.close()

    text = "\n".join(captured_logs.lines)
    assert "job submitted" in text and "webhook secret rotated" in text  # the capture saw the gateway's logs
    for secret in [*keys, *secrets]:
        assert secret not in text, "a key or webhook secret reached the log"
        assert secret[8:24] not in text  # nor a recognisable part of one


# --- CORS --------------------------------------------------------------------------------------------------
def _preflight(client: TestClient, origin: str) -> Any:
    return client.options("/generate", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_headers_go_to_configured_origins_only(make_gateway) -> None:
    gw = make_gateway(cors_origins="https://ui.example.com, https://other-ui.example.com/")
    for origin in ("https://ui.example.com", "https://other-ui.example.com"):
        r = _preflight(gw.client, origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, r.headers
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = gw.client.get("/jobs", headers={**gw.h(gw.user), "Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    for origin in ("https://evil.example.com", "http://ui.example.com", "https://ui.example.com.evil.net"):
        r = _preflight(gw.client, origin)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, (origin, r.headers)
        r = gw.client.get("/jobs", headers={**gw.h(gw.user), "Origin": origin})
        assert "access-control-allow-origin" not in r.headers, origin


def test_no_cors_headers_by_default(make_gateway) -> None:
    gw = make_gateway()
    assert get_settings().cors_origins == []
    r = _preflight(gw.client, "https://ui.example.com")
    assert "access-control-allow-origin" not in r.headers
    r = gw.client.get("/jobs", headers={**gw.h(gw.user), "Origin": "https://ui.example.com"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# --- uploads -----------------------------------------------------------------------------------------------
def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(out, format="PNG")
    return out.getvalue()


def test_uploads_are_stored_under_names_the_gateway_chose(make_gateway, tmp_path, monkeypatch) -> None:
    gw = make_gateway()
    data_dir = get_settings().data_dir
    monkeypatch.chdir(tmp_path)
    names = ["../../evil.png", "/tmp/evil-abs.png", "..\\..\\evil-win.png", "evil\x00.png", ".evil-hidden.png"]
    r = gw.client.post("/multiref", headers=gw.h(gw.user), data={"prompt": "combine them", "num_steps": "2"},
                       files=[("images", (name, _png(), "image/png")) for name in names])
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    params = gw.client.get(f"/jobs/{job_id}", headers=gw.h(gw.user)).json()["params"]
    assert params["references"] == [f"uploads/{job_id}/{n}.png" for n in range(len(names))]
    stored = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()
                    and "uploads" in p.parts)
    assert stored == [f"uploads/{job_id}/{n}.png" for n in range(len(names))]
    for folder in {data_dir, data_dir.parent, data_dir.parent.parent, data_dir / "uploads", tmp_path,
                   tmp_path.parent}:
        assert not [p for p in folder.iterdir() if "evil" in p.name], folder
    assert not [p for p in data_dir.rglob("*") if "evil" in p.name]


# --- cross-key isolation -----------------------------------------------------------------------------------
def test_another_keys_jobs_do_not_exist_for_a_user_key(make_gateway) -> None:
    gw = make_gateway(preview_every="1")
    mine = gw.client.post("/generate", json=JOB, headers=gw.h(gw.user)).json()["id"]
    theirs = gw.client.post("/generate", json=JOB, headers=gw.h(gw.other)).json()["id"]
    with session_scope(gw.database_url) as s:  # their job runs, shows a preview, then succeeds
        assert crud.mark_running(session=s, job_id=theirs, worker="w", gpu=None)
        crud.update_progress(session=s, job_id=theirs, step=1, total=2, preview=_png())

    def refused(method: str, url: str) -> None:
        r = gw.client.request(method, url, headers=gw.h(gw.user))
        assert r.status_code == 404, (method, url, r.status_code, r.text)
        unknown = gw.client.request(method, url.replace(theirs, "0" * 32), headers=gw.h(gw.user))
        assert unknown.status_code == 404
        # the same answer as an id never used: nothing tells that the job exists
        assert r.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
        assert r.json()["error"]["message"].replace(theirs, "0" * 32) == unknown.json()["error"]["message"]

    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/images/0"), ("GET", "/images/0?format=webp")):
        refused(method, f"/jobs/{theirs}{path}")
    listed = gw.client.get("/jobs", headers=gw.h(gw.user)).json()
    assert [j["id"] for j in listed["data"]] == [mine]
    refused("DELETE", f"/jobs/{theirs}")  # and the cancel did nothing
    with session_scope(gw.database_url) as s:
        job = crud.get_job(session=s, job_id=theirs)
        assert job.status == "running" and not job.cancel_requested
        assert crud.mark_succeeded(session=s, job_id=theirs, result={"images": ["x.png"], "seed": 1})
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/images/0")):
        refused(method, f"/jobs/{theirs}{path}")

    # their owner and an admin see it
    assert gw.client.get(f"/jobs/{theirs}", headers=gw.h(gw.other)).json()["status"] == "succeeded"
    assert gw.client.get(f"/jobs/{theirs}", headers=gw.h(gw.admin)).status_code == 200
    assert gw.client.get(f"/jobs/{mine}", headers=gw.h(gw.user)).status_code == 200
