"""The FastAPI application: ``create_app(settings)``; ``echo4o serve`` runs it on uvicorn.

The gateway never imports torch or the engine: it validates requests, writes job rows, enqueues them on
Celery and reads the rows back. See docs/api.md for the HTTP API and docs/contracts.md for the contracts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from backend.api.routes import (
    admin,
    admin_benchmarks,
    admin_finetune,
    admin_models,
    events,
    generate,
    health,
    images,
    jobs,
    keys,
    models,
    multiref,
    openai,
    parameters,
)
from backend.errors import install_handlers
from backend.metrics import HttpMetricsMiddleware, Metrics
from backend.services.watch_hub import WatchHub, register_hub
from backend.services.webhooks import WebhookDispatcher
from echo4o import __version__
from echo4o.db import upgrade_to_head
from echo4o.logging import get_logger
from echo4o.settings import Settings, get_settings

log = get_logger(__name__)

BODY_SLACK_BYTES = 1024 * 1024  # form fields and multipart framing on top of the images


def max_body_bytes(settings: Settings) -> int:
    """Largest request body: every reference at the byte cap, base64-inflated, plus the other fields."""
    return settings.max_references * settings.max_upload_bytes * 4 // 3 + BODY_SLACK_BYTES


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway for ``settings`` (default: the process settings from ECHO4O_* variables).

    Job payload validation and the queue read the process settings, so pass the same object
    :func:`echo4o.settings.get_settings` returns (the default) unless only gateway fields differ.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade_to_head(settings.database_url)
        log.info("gateway ready", extra={"version": __version__, "auth": settings.auth,
                                         "broker": "embedded" if settings.embedded_broker else "configured",
                                         "model_version": settings.model_version})
        dispatcher = asyncio.create_task(WebhookDispatcher(settings).run(), name="webhook-dispatcher")
        hub = app.state.watch_hub = WatchHub(settings, on_rows_read=app.state.metrics.job_row_reads.inc,
                                             persistent=True)
        await hub.start()  # one reader of watched job rows for every event stream and ?wait of this process
        register_hub(settings, hub)
        try:
            yield
        finally:
            register_hub(settings, None)
            await hub.stop()
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher

    app = FastAPI(
        title="Echo-4o image generation API",
        version=__version__,
        description="Text-to-image and multi-reference generation with Echo-4o (BAGEL-7B-MoT), served through "
                    "a job queue. Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
        lifespan=lifespan,
        max_body_size=max_body_bytes(settings),
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings.database_url)
    install_handlers(app)
    for module in (generate, multiref, jobs, events, images, health, models, parameters, admin, openai, keys):
        app.include_router(module.router)
    app.include_router(admin_models.router)
    app.include_router(admin_benchmarks.router)
    app.include_router(admin_finetune.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    return app
