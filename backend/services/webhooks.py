"""Webhooks: when a job that carries ``webhook_url`` ends (succeeded, failed or cancelled), the gateway POSTs
the job's JSON (the view ``GET /jobs/{id}`` returns) to that URL, signed with its owner's webhook secret.

- At submit, :func:`check_url` refuses (422 naming ``webhook_url``) a URL whose host does not resolve, or
  resolves to a private, loopback, link-local or otherwise non-public address (unless
  ``ECHO4O_WEBHOOK_ALLOW_PRIVATE=true``); :func:`register` writes the job's ``waiting`` delivery row.
- :class:`WebhookDispatcher` runs in every gateway process (started by the app's lifespan): once per
  ``ECHO4O_WEBHOOK_POLL_S`` it reads the due rows whose job has ended (indexed reads), claims each with a
  conditional UPDATE (so several gateways never send the same attempt), re-checks the resolved address and
  connects to that very address (:func:`pinned`), POSTs, and records the outcome. A failed attempt (no
  answer, or an answer other than 2xx; redirects are not followed) is retried after
  ``ECHO4O_WEBHOOK_RETRY_BASE_S`` doubled per attempt, at most
  ``ECHO4O_WEBHOOK_MAX_ATTEMPTS`` times. Rows live in the database, so a restarted gateway finds them due:
  delivery is at least once (the ``X-Echo4o-Webhook-Id`` header, the job id, lets a receiver drop repeats).
- Signature: ``X-Echo4o-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` with
  ``X-Echo4o-Timestamp: <unix seconds>``; :func:`verify` is what a receiver does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy.orm import Session

from backend.errors import invalid
from backend.services.blocking import in_session, run_sync
from echo4o import __version__
from echo4o.db import crud
from echo4o.db import webhooks as records
from echo4o.db.models import Job
from echo4o.logging import get_logger
from echo4o.settings import Settings

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Echo4o-Signature"
TIMESTAMP_HEADER = "X-Echo4o-Timestamp"
ID_HEADER = "X-Echo4o-Webhook-Id"
ATTEMPT_HEADER = "X-Echo4o-Webhook-Attempt"
#: A receiver refuses a timestamp further than this from its clock (replay of an old, captured delivery).
DEFAULT_TOLERANCE_S = 300
LEASE_SLACK_S = 30.0  # a claimed attempt is taken over this long after its timeout (its gateway died)
BATCH = 50  # deliveries attempted per poll at most
FAILURE_REPORT_EVERY_S = 60.0  # while polls keep failing (database down), log it this often


class UnsafeAddress(ValueError):
    """The webhook's host does not resolve, or resolves to an address deliveries may not go to."""


def is_public(address: str) -> bool:
    """A globally routable unicast address (no private, loopback, link-local, shared, reserved, multicast)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_checked(settings: Settings, url: str) -> list[str]:
    """The addresses ``url``'s host resolves to, every one allowed (raises :class:`UnsafeAddress`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise UnsafeAddress(f"host {host!r} does not resolve ({exc})") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not settings.webhook_allow_private:
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise UnsafeAddress(
                f"host {host!r} resolves to {refused[0]}, a private, loopback, link-local or otherwise non-public "
                "address; give a public URL (a receiver on your own network needs "
                "ECHO4O_WEBHOOK_ALLOW_PRIVATE=true on the gateway)")
    return addresses


def pinned(url: str, addresses: list[str]) -> tuple[str, dict[str, str], dict[str, object]]:
    """``url`` aimed at one of the checked ``addresses`` (IPv4 first), so the connection goes where the check
    looked, not wherever a second lookup would now answer (DNS rebinding): (url, headers, httpx extensions).
    The ``Host`` header and, for https, the TLS server name (certificate check included) stay the URL's host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return url, {}, {}  # an address already
    except ValueError:
        pass
    address = sorted(addresses, key=lambda a: ":" in a)[0]
    netloc = (f"[{address}]" if ":" in address else address) + (f":{parts.port}" if parts.port else "")
    headers = {"Host": host + (f":{parts.port}" if parts.port else "")}
    return urlunsplit(parts._replace(netloc=netloc)), headers, ({"sni_hostname": host} if parts.scheme == "https"
                                                                   else {})


def check_url(settings: Settings, url: str | None) -> str | None:
    """``url`` when deliveries may go there; 422 naming ``webhook_url`` otherwise."""
    if url is None:
        return None
    try:
        resolve_checked(settings, url)
    except UnsafeAddress as exc:
        raise invalid("webhook_url", f"webhook_url: {exc}", code="webhook_url_refused") from None
    return url


def register(session: Session, settings: Settings, job_id: str, owner: str, url: str) -> None:
    """The job's ``waiting`` delivery, and its owner's secret made if it has none yet."""
    records.get_secret(session=session, owner=owner)
    records.create_delivery(session=session, job_id=job_id, owner=owner, url=url, base_url=settings.public_url)


async def checked(settings: Settings, url: str | None) -> str | None:
    """:func:`check_url` off the event loop (it resolves the host), for routes that submit on their own."""
    return await run_sync(check_url, settings, url)


async def attach(settings: Settings, job: Job, url: str | None) -> None:
    """:func:`register` ``url`` (checked) for ``job`` once it is submitted. A job that ends first is delivered
    all the same: the dispatcher only needs the row and the job's end."""
    if url:
        await in_session(settings, lambda s: register(s, settings, job.id, job.owner, url))


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 keyed by ``secret`` over ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, sig: str, *, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """What a receiver checks: the signature matches (compared in constant time) and the timestamp is within
    ``tolerance_s`` of its clock, so a captured delivery cannot be replayed later."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), sig)


def retry_delay(settings: Settings, attempt: int) -> float | None:
    """Seconds before the attempt after ``attempt`` (1-based); None when none is left."""
    if attempt >= settings.webhook_max_attempts:
        return None
    return min(settings.webhook_retry_base_s * 2 ** (attempt - 1), settings.webhook_retry_max_s)


def _payload(session: Session, settings: Settings, job_id: str) -> tuple[str, bytes, str]:
    """(url, body, secret) of the job's delivery: the body is the job's public view as of now."""
    from backend.services.views import public_job  # views imports the records layer only; no cycle at import

    row = records.get_delivery(session=session, job_id=job_id)
    job = crud.get_job(session=session, job_id=job_id)
    assert row is not None and job is not None
    base = (settings.public_url or row.base_url).rstrip("/")
    body = public_job(session, job, base).model_dump_json().encode("utf-8")
    return row.url, body, records.get_secret(session=session, owner=row.owner)


class WebhookDispatcher:
    """Delivers due webhooks of this gateway's database; :meth:`run` until cancelled, or :meth:`tick` once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False,
                                             headers={"User-Agent": f"echo4o-webhook/{__version__}"})
        return self._client

    async def run(self) -> None:
        log.info("webhook dispatcher started", extra={"poll_s": self.settings.webhook_poll_s})
        failing_since: float | None = None
        last_report = 0.0
        try:
            while True:
                try:
                    await self.tick()
                    if failing_since is not None:
                        log.info("webhook dispatcher polls again",
                                 extra={"failed_for_s": round(time.monotonic() - failing_since, 1)})
                        failing_since = None
                except Exception:  # a database hiccup must not end deliveries for the process's life
                    now = time.monotonic()
                    if failing_since is None or now - last_report >= FAILURE_REPORT_EVERY_S:  # not once a second
                        log.exception("webhook dispatcher poll failed; trying again every poll")
                        last_report = now
                    failing_since = failing_since or now
                await asyncio.sleep(self.settings.webhook_poll_s)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def tick(self) -> int:
        """Attempt every due delivery once (concurrently); the number attempted."""
        due = await in_session(self.settings, lambda s: records.due_deliveries(session=s, limit=BATCH))
        results = await asyncio.gather(*(self._attempt(d) for d in due))
        return sum(results)

    async def _attempt(self, due: records.Due) -> bool:
        lease = self.settings.webhook_timeout_s + LEASE_SLACK_S
        attempt = await in_session(self.settings, lambda s: records.claim(session=s, due=due, lease_s=lease))
        if attempt is None:
            return False  # another gateway took it
        status: int | None = None
        error: str | None = None
        url = ""
        try:
            url, body, secret = await in_session(self.settings, lambda s: _payload(s, self.settings, due.job_id))
            addresses = await run_sync(resolve_checked, self.settings, url)
            target, host_headers, extensions = pinned(url, addresses)
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
                       SIGNATURE_HEADER: signature(secret, timestamp, body), ID_HEADER: due.job_id,
                       ATTEMPT_HEADER: str(attempt), **host_headers}
            response = await self.client.post(target, content=body, headers=headers, extensions=extensions)
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        except UnsafeAddress as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        retry_in = None if error is None else retry_delay(self.settings, attempt)
        recorded = await in_session(self.settings, lambda s: records.record_attempt(
            session=s, job_id=due.job_id, attempt=attempt, status=status, error=error, retry_in_s=retry_in))
        # the host only: a URL may carry a receiver's token in its path or query
        extra = {"job_id": due.job_id, "attempt": attempt, "status": status, "host": urlsplit(url).hostname}
        if error is None:
            log.info("webhook delivered", extra=extra)
        else:
            log.warning("webhook attempt failed", extra={**extra, "error": error, "retry_in_s": retry_in,
                                                         "recorded": recorded})
        return True


def secret_view(session: Session, owner: str) -> dict[str, object]:
    secret = records.get_secret(session=session, owner=owner)
    return {"secret": secret, "created_at": records.secret_created_at(session=session, owner=owner)}
