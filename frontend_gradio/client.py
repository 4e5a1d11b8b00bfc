"""A small synchronous client of the gateway's HTTP API (docs/contracts.md, "HTTP API").

The demo talks to the gateway through this module only. Every failure surfaces as :class:`ApiError`,
carrying the contract's error fields (message, type, param, code) and an HTTP status, so that the UI can
show one readable line for it.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
from httpx_sse import connect_sse

from echo4o.logging import get_logger

log = get_logger(__name__)

# What an SSE stream may end with (docs/contracts.md, GET /jobs/{id}/events).
TERMINAL_EVENTS = ("done", "failed", "cancelled")


class ApiError(Exception):
    """An error answered by the gateway (or the absence of an answer), in the contract's shape."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str = "api_error",  # noqa: A002 - the contract's field name
        param: str | None = None,
        code: str = "error",
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def readable(self) -> str:
        """One line for a person: what went wrong, the field at fault, and what to do where we know."""
        text = self.message.rstrip(".")
        text = text[:1].upper() + text[1:]
        if self.param:
            text += f" (field: {self.param})"
        if self.status == 401:
            text += ". Enter a valid API key (create one with `echo4o keys create`)"
        elif self.status == 429:
            wait = f" in {self.retry_after} s" if self.retry_after else " later"
            text += f". Try again{wait}"
        return text + "."

    def __str__(self) -> str:
        return self.readable()


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's progress stream: ``queued``, ``progress``, ``done``, ``failed`` or ``cancelled``."""

    name: str
    data: dict[str, Any]


def _error_from_response(resp: httpx.Response) -> ApiError:
    retry_after = resp.headers.get("retry-after")
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return ApiError(
            str(err["message"]),
            status=resp.status_code,
            type=str(err.get("type") or "api_error"),
            param=err.get("param"),
            code=str(err.get("code") or "error"),
            retry_after=retry_after,
        )
    text = resp.text.strip()[:300] or resp.reason_phrase
    return ApiError(
        f"The gateway answered {resp.status_code} {resp.reason_phrase}: {text}",
        status=resp.status_code,
        code=f"http_{resp.status_code}",
        retry_after=retry_after,
    )


class GatewayClient:
    """Calls the gateway at ``base_url``. Thread-safe: one instance serves every UI session; each call
    passes the API key of the session that makes it (falling back to ``default_key``)."""

    def __init__(self, base_url: str, default_key: str | None = None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.default_key = default_key or None
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self._http.close()

    # --- plumbing --------------------------------------------------------------------------------
    def _headers(self, key: str | None) -> dict[str, str]:
        key = key or self.default_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(
            f"Cannot reach the gateway at {self.base_url} ({type(exc).__name__}: {exc}). "
            "Start it with `echo4o serve`, or point the UI at it with `echo4o ui --api URL`",
            code="gateway_unreachable",
        )

    def request(self, method: str, path: str, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path.lstrip("/"), headers=self._headers(key), **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code >= 400:
            err = _error_from_response(resp)
            log.info("gateway error", extra={"path": path, "status": resp.status_code, "code": err.code})
            raise err
        return resp

    def _json(self, method: str, path: str, *, key: str | None = None, **kwargs: Any) -> Any:
        return self.request(method, path, key=key, **kwargs).json()

    # --- jobs ------------------------------------------------------------------------------------
    def submit_generate(self, params: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """POST /generate; returns ``{id, status, status_url, events_url}``."""
        return self._json("POST", "generate", key=key, json=params)

    def submit_multiref(
        self, params: dict[str, Any], references: list[str | Path], *, key: str | None = None
    ) -> dict[str, Any]:
        """POST /multiref as JSON with the reference images base64-encoded, in the order given."""
        images = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in references]
        return self._json("POST", "multiref", key=key, json={**params, "images": images})

    def get_job(self, job_id: str, *, key: str | None = None) -> dict[str, Any]:
        return self._json("GET", f"jobs/{job_id}", key=key)

    def list_jobs(
        self, *, key: str | None = None, all_users: bool = False, status: str | None = None,
        limit: int = 50, offset: int = 0,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if all_users:
            params["all"] = "true"
        if status:
            params["status"] = status
        return self._json("GET", "jobs", key=key, params=params)

    def cancel(self, job_id: str, *, key: str | None = None) -> dict[str, Any]:
        return self._json("DELETE", f"jobs/{job_id}", key=key)

    def image_bytes(self, job_id: str, index: int, *, key: str | None = None, fmt: str = "png") -> bytes:
        """The stored result image; PNG keeps the generation parameters in its text chunks."""
        return self.request("GET", f"jobs/{job_id}/images/{index}", key=key, params={"format": fmt}).content

    def events(self, job: dict[str, Any], *, key: str | None = None, poll_s: float = 1.0) -> Iterator[JobEvent]:
        """The job's events until it ends. Reads the SSE stream; if the stream breaks off, goes on by
        polling ``GET /jobs/{id}`` so that a dropped connection never loses the result."""
        job_id = job["id"]
        url = urljoin(self.base_url, job.get("events_url") or f"jobs/{job_id}/events")
        try:
            with connect_sse(
                # the gateway pings every 10 s: a minute of silence means the stream is dead (then: polling)
                self._http, "GET", url, headers=self._headers(key), timeout=httpx.Timeout(30.0, read=60.0)
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise _error_from_response(source.response)
                for sse in source.iter_sse():
                    data = sse.json() if sse.data else {}
                    event = JobEvent(sse.event or "message", data if isinstance(data, dict) else {"value": data})
                    yield event
                    if event.name in TERMINAL_EVENTS:
                        return
        except httpx.TransportError as exc:
            log.warning("event stream broke off; polling", extra={"job_id": job_id, "error": str(exc)})
        yield from self._poll(job_id, key=key, poll_s=poll_s)

    def _poll(self, job_id: str, *, key: str | None, poll_s: float) -> Iterator[JobEvent]:
        last_step = None
        while True:
            job = self.get_job(job_id, key=key)
            status = job.get("status")
            if status == "succeeded":
                yield JobEvent("done", job)
                return
            if status == "failed":
                yield JobEvent("failed", job.get("error") or {"code": "failed", "message": "the job failed"})
                return
            if status == "cancelled":
                yield JobEvent("cancelled", {})
                return
            progress = job.get("progress") or {}
            if status == "queued":
                yield JobEvent("queued", {"position": job.get("queue_position")})
            elif progress.get("step") != last_step:
                last_step = progress.get("step")
                yield JobEvent("progress", {"step": progress.get("step"), "total": progress.get("total")})
            time.sleep(poll_s)

    # --- service and admin -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "healthz")

    def parameters(self) -> dict[str, Any]:
        """``GET /parameters`` (no key needed): job kinds, statuses, aspect-ratio presets, renorm types, limits
        and each image kind's defaults, as ``backend.schemas.JobParameters`` JSON. The UI builds its forms
        from this answer and keeps no copy of these facts."""
        return self._json("GET", "parameters")

    def models(self, *, key: str | None = None) -> Any:
        return self._json("GET", "models", key=key)

    def admin_workers(self, *, key: str | None = None) -> Any:
        return self._json("GET", "admin/workers", key=key)

    def admin_queue(self, *, key: str | None = None) -> Any:
        return self._json("GET", "admin/queue", key=key)

    def submit_finetune(self, params: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """POST /admin/finetune (admin keys); returns ``{id, status, status_url, events_url}``."""
        return self._json("POST", "admin/finetune", key=key, json=params)

    def admin_models(self, *, key: str | None = None) -> dict[str, Any]:
        """GET /admin/models: ``{current, configured, data: [{ref, source, path, manifest, current, ...}], ...}``."""
        return self._json("GET", "admin/models", key=key)

    def promote_model(self, ref: str, *, key: str | None = None) -> dict[str, Any]:
        """POST /admin/models/{ref}/promote: ``{current, previous}``."""
        return self._json("POST", f"admin/models/{ref}/promote", key=key)

    def rollback_model(self, *, key: str | None = None) -> dict[str, Any]:
        """POST /admin/models/rollback: ``{current, previous}``."""
        return self._json("POST", "admin/models/rollback", key=key)

    def is_admin(self, *, key: str | None = None) -> bool:
        """Whether the key may use the admin routes: 200 from ``GET /admin/queue`` yes, 403 no.
        A missing or wrong key (401) raises, so that the UI can say so."""
        try:
            self.request("GET", "admin/queue", key=key)
        except ApiError as err:
            if err.status in (403, 404):
                return False
            raise
        return True
