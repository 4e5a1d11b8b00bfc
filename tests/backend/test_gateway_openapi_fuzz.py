"""Schemathesis against the gateway's own OpenAPI spec (a bounded run per operation): whatever it sends,
the gateway answers without a 5xx, and every 4xx carries the contract's error shape.

The app runs in-process with real Redis as broker and a real SQLite database, and no worker, so jobs stay
queued. The 5xx answers allowed are the ones that say so on purpose: `/readyz`'s 503 (no worker) and the
synchronous OpenAI facade's 504 `timeout` for a *valid* request that no worker ran within ECHO4O_WAIT_MAX_S
(set to 0.2 s here).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from backend.app import create_app
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.settings import get_settings


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> str:
    for name, value in {"BROKER_URL": redis_url, "WAIT_MAX_S": "0.2", "RATE_LIMIT_PER_MINUTE": "1000000",
                        "MAX_QUEUED_JOBS_PER_KEY": "1000000", "MAX_UPLOAD_BYTES": str(64 * 1024)}.items():
        monkeypatch.setenv(f"ECHO4O_{name}", value)
    get_settings.cache_clear()
    upgrade_to_head(get_settings().database_url)
    with session_scope() as s:
        return crud.create_api_key(session=s, name="fuzz", is_admin=True)[1]


def _cases() -> list[tuple[str, str, GenerationMode]]:
    """Every operation with valid inputs; those that take inputs also with invalid ones."""
    spec = create_app().openapi()  # the spec does not depend on settings
    cases = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody"):
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


@pytest.mark.parametrize(("method", "path", "mode"), _cases(), ids=lambda v: getattr(v, "value", v))
def test_no_server_errors_and_errors_have_the_contract_shape(method: str, path: str, mode: GenerationMode,
                                                             api_key: str) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(get_settings()))
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {api_key}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case) -> None:
        response = case.call(headers=headers)
        status = response.status_code
        content_type = response.headers.get("content-type") or [""]
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        body = response.json() if content_type.startswith("application/json") else None
        if path == "/readyz" and status == 503:  # no worker runs here: not ready, and it says why
            assert body["status"] == "not_ready" and "echo4o worker" in body["checks"]["workers"]
        elif status >= 500:
            assert status == 504 and path.startswith("/v1/images/") and body["error"]["code"] == "timeout", (
                f"{method} {path} -> {status}: {response.text[:500]}")
        if 400 <= status < 500:
            assert body is not None and set(body["error"]) == {"message", "type", "param", "code"}, (
                f"{method} {path} -> {status}: {response.text[:500]}")

    check()
