"""What the gateway needs around it when it faces the network (``echo4o serve`` wraps the app with
:func:`for_serving`): two ASGI guards uvicorn does not provide.

* :class:`BodyDeadline`: a client has ``ECHO4O_BODY_TIMEOUT_S`` seconds to send a request's whole body. uvicorn
  has no body read timeout, so a client that sends its headers and then trickles the body (a byte now and then)
  would hold a connection and a request for ever; past the deadline it gets a 408 and the connection is closed.
* :class:`TooLargeAsError`: the body-size cap (FastAPI's ``max_body_size``, sized by
  :func:`backend.app.max_body_bytes`) answers a bare ``Content Too Large`` text; this gives that 413 the error
  shape of every other answer, naming the cap.
* :class:`EndStreamsCleanly`: on shutdown sse-starlette stops each event stream by cancelling it, and returns
  without ending the HTTP body, which uvicorn answers by dropping the connection; this sends the last, empty
  chunk instead, so a connected client sees its stream end normally (and may reconnect elsewhere).

And, in a serving process only (``heap=True``; never in a test's process), :class:`FreezeHeapWhenStarted`: once
the app's startup is complete, the objects alive then are frozen out of garbage collection (:mod:`echo4o.heap`),
so that no full collection pauses a request for 80-140 ms.
"""

from __future__ import annotations

import json
import time

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.errors import ApiError
from echo4o.heap import freeze_long_lived
from echo4o.settings import Settings


class BodyDeadline:
    """408 for a request whose body has not fully arrived ``timeout_s`` seconds after the app first asked for it.

    The deadline covers the whole body, not the gap between chunks: a client trickling a byte a second still
    ends. The 408 is raised from ``receive`` as an HTTPException, so the app's handlers give it the error shape.
    """

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        body_done = False

        async def timed_receive() -> Message:
            nonlocal deadline, body_done
            if body_done:  # after the body: only http.disconnect is left to wait for, however long it takes
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.timeout_s
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
                return message
            raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                     "(ECHO4O_BODY_TIMEOUT_S); send it at once, or raise the limit for slow links",
                                headers={"Connection": "close"})

        await self.app(scope, timed_receive, send)


class TooLargeAsError:
    """Replaces the plain-text 413 of the body-size cap with the contract's error body."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        err = ApiError(413, f"the request body is larger than the {max_body_bytes} bytes the gateway accepts "
                            "(ECHO4O_MAX_REFERENCES images of ECHO4O_MAX_UPLOAD_BYTES each, base64-encoded, plus "
                            "1 MiB): send fewer or smaller images", code="request_too_large")
        self.body = json.dumps(err.body()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def reshaping_send(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413 and any(
                    k.lower() == b"content-type" and v.startswith(b"text/plain") for k, v in message["headers"]):
                replaced = True
                await send({"type": "http.response.start", "status": 413, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode()),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": self.body, "more_body": False})
            elif not replaced:
                await send(message)

        await self.app(scope, receive, reshaping_send)


class EndStreamsCleanly:
    """Ends a streamed response the app returned from without ending (an event stream stopped at shutdown)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def watching_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        await self.app(scope, receive, watching_send)
        if started and not ended:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away meanwhile
                pass


class FreezeHeapWhenStarted:
    """Freezes the process's long-lived objects (:func:`echo4o.heap.freeze_long_lived`) once the app reports its
    startup complete (the lifespan's ``lifespan.startup.complete``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def freezing_send(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                freeze_long_lived("gateway")

        await self.app(scope, receive, freezing_send)


def for_serving(app: ASGIApp, settings: Settings, *, heap: bool = False) -> ASGIApp:
    """``app`` as ``echo4o serve`` runs it: bodies under a deadline, a 413 in the error shape, streams ended
    cleanly; with ``heap``, the process's long-lived objects frozen once it has started (a serving process's
    own setting: a test's process keeps its collector as it is)."""
    from backend.app import max_body_bytes

    app = TooLargeAsError(app, max_body_bytes=max_body_bytes(settings))
    app = EndStreamsCleanly(BodyDeadline(app, timeout_s=settings.body_timeout_s))
    return FreezeHeapWhenStarted(app) if heap else app


def serving_app() -> ASGIApp:
    """The app of ``echo4o serve`` built from the environment's settings: the factory a process server imports
    (``uvicorn --factory backend.serving:serving_app``, and each process of ``ECHO4O_GATEWAY_PROCESSES``)."""
    from backend.app import create_app
    from echo4o.logging import setup_logging
    from echo4o.settings import get_settings

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)  # a process started afresh: its logs as the parent's
    return for_serving(create_app(settings), settings, heap=True)
