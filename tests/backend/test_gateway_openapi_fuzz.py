"""Schemathesis against the gateway's own OpenAPI spec: every operation (admin and OpenAI-style ones included,
called with an admin key), valid and invalid inputs, a bounded run each. Whatever it sends, the gateway answers
without a 5xx, every answer conforms to the spec (status code, content type, headers, body schema: schemathesis'
own checks), and every 4xx carries the contract's error shape.

The app runs in-process with real Redis as broker and a real SQLite database, and no worker, so jobs stay
queued. Job routes are also called with the ids of real jobs (one queued, one cancelled) so their 200 answers
are checked too, not only 404s. The 5xx answers allowed are the ones that say so on purpose: `/readyz`'s 503
(no worker) and the synchronous OpenAI facade's 504 `timeout` for a *valid* request that no worker ran within
ECHO4O_WAIT_MAX_S (set to 0.2 s here).

Examples per operation and mode: ``ECHO4O_TEST_FUZZ_EXAMPLES`` (default 20: about 800 requests and a CPU-minute;
raise it for a longer run). The figures (requests sent, answers by status class, 5xx seen) are printed at the end
of the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from backend.app import create_app
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.settings import get_settings
from tests.support import figures

EXAMPLES = int(os.environ.get("ECHO4O_TEST_FUZZ_EXAMPLES", "20"))
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@dataclass
class Tally:
    """What the fuzz sent and got back, over the whole module."""

    requests: int = 0
    operations: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)  # "METHOD path status" -> count (allowed ones)


TALLY = Tally()


@dataclass
class Gateway:
    schema: schemathesis.schemas.BaseSchema
    headers: dict[str, str]
    queued_job: str
    cancelled_job: str


@pytest.fixture(scope="module")
def gateway(module_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    env = {"BROKER_URL": module_redis_url, "DATA_DIR": str(data_dir), "DATABASE_URL": "", "WAIT_MAX_S": "0.2",
           "RATE_LIMIT_PER_MINUTE": "1000000", "MAX_QUEUED_JOBS_PER_KEY": "1000000",
           "MAX_UPLOAD_BYTES": str(64 * 1024), "AUTH": "keys", "PUBLIC_URL": ""}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(f"ECHO4O_{name}", value)
        get_settings.cache_clear()
        try:
            upgrade_to_head(get_settings().database_url)
            with session_scope() as s:
                key = crud.create_api_key(session=s, name="fuzz", is_admin=True)[1]
            headers = {"Authorization": f"Bearer {key}"}
            app = create_app(get_settings())
            with TestClient(app, headers=headers) as client:  # real jobs for the job routes' 200 answers
                queued = client.post("/generate", json={"prompt": "a red cube", "num_steps": 2}).json()["id"]
                cancelled = client.post("/generate", json={"prompt": "a blue cube", "num_steps": 2}).json()["id"]
                assert client.delete(f"/jobs/{cancelled}").json()["status"] == "cancelled"
            yield Gateway(schemathesis.openapi.from_asgi("/openapi.json", app), headers, queued, cancelled)
        finally:
            get_settings.cache_clear()
    figures.report("gateway figures", _figures())


def _figures() -> str:
    allowed = ", ".join(f"{k} x{v}" for k, v in sorted(TALLY.server_errors.items())) or "none"
    by_class = ", ".join(f"{k}: {v}" for k, v in sorted(TALLY.statuses.items()))
    return (f"gateway OpenAPI fuzz: {TALLY.requests} requests over {len(TALLY.operations)} operations "
            f"({EXAMPLES} examples per operation and mode); answers {by_class}; "
            f"5xx seen: {sum(TALLY.server_errors.values())} (all deliberate: {allowed})")


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


def _real_job_ids(path: str, gw: Gateway) -> list[str]:
    """Ids of real jobs to put in ``{job_id}``: a queued job's event stream would not end, so only the cancelled
    one there."""
    if "{job_id}" not in path:
        return []
    return [gw.cancelled_job] if path.endswith("/events") else [gw.queued_job, gw.cancelled_job]


@pytest.mark.parametrize(("method", "path", "mode"), _cases(), ids=lambda v: getattr(v, "value", v))
def test_no_server_errors_and_answers_conform_to_the_spec(method: str, path: str, mode: GenerationMode,
                                                          gateway: Gateway) -> None:
    operation = gateway.schema[path][method]
    real_ids = _real_job_ids(path, gateway) if mode is GenerationMode.POSITIVE else []
    real_id = st.sampled_from([None, *real_ids]) if real_ids else st.none()
    TALLY.operations.add(f"{method} {path}")

    @given(case=operation.as_strategy(generation_mode=mode), job_id=real_id)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case, job_id: str | None) -> None:
        if job_id is not None:
            case.path_parameters = {**(case.path_parameters or {}), "job_id": job_id}
        response = case.call(headers=gateway.headers)
        status = response.status_code
        TALLY.requests += 1
        TALLY.statuses[f"{status // 100}xx"] += 1
        content_type = response.headers.get("content-type") or [""]
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        body = response.json() if content_type.startswith("application/json") else None
        if path == "/readyz" and status == 503:  # no worker runs here: not ready, and it says why
            assert body["status"] == "not_ready" and "echo4o worker" in body["checks"]["workers"]
        elif status >= 500:
            assert status == 504 and path.startswith("/v1/images/") and body["error"]["code"] == "timeout", (
                f"{method} {path} -> {status}: {response.text[:500]}")
        if status >= 500:
            TALLY.server_errors[f"{method} {path} {status}"] += 1
        if 400 <= status < 500:
            assert body is not None and set(body["error"]) == {"message", "type", "param", "code"}, (
                f"{method} {path} -> {status}: {response.text[:500]}")
        case.validate_response(response, checks=CHECKS, headers=gateway.headers)

    check()
