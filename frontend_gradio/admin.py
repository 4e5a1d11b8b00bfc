"""The admin tab: one sub-tab per :class:`AdminSection`, shown only to a session whose key is an admin key.

To add a panel (as ``admin_finetune.py`` and ``admin_benchmarks.py`` do), write a function
``build(ctx) -> SectionHandle`` that creates its components
(forms, buttons wired to ``ctx.client`` with ``ctx.key_state`` as an input) and append
``AdminSection("Title", build)`` to :data:`ADMIN_SECTIONS`. The tab's Refresh button, and opening the tab,
call every section's ``refresh(key)`` and write what it returns into its ``outputs``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from frontend_gradio import views
from frontend_gradio.client import ApiError, GatewayClient

ANY_STATUS = "any"  # a status filter's "no filter" choice


@dataclass
class AdminContext:
    """What a section builds with: the gateway client, the session's key, and the job statuses the gateway
    knows (from ``GET /parameters``, for status filters)."""

    client: GatewayClient
    key_state: gr.State
    statuses: list[str]


@dataclass
class SectionHandle:
    """What a section shows, and how to fetch it again: ``refresh(key)`` returns one value per output."""

    outputs: list[Any] = field(default_factory=list)
    refresh: Callable[[str | None], list[Any]] | None = None


@dataclass(frozen=True)
class AdminSection:
    title: str
    build: Callable[[AdminContext], SectionHandle]


def _note(err: ApiError) -> str:
    return f"⚠️ {err.readable()}"


def _empty(columns: list[str]) -> list[list[str]]:
    return [["" for _ in columns]]


def _build_overview(ctx: AdminContext) -> SectionHandle:
    note = gr.Markdown("", elem_id="admin-note")
    workers = gr.Dataframe(headers=views.WORKER_COLUMNS, label="Workers", interactive=False,
                           elem_id="admin-workers", wrap=True)
    queue = gr.Dataframe(headers=views.ADMIN_JOB_COLUMNS, label="Queue (running, then next to run first)",
                         interactive=False, elem_id="admin-queue", wrap=True)
    models = gr.Dataframe(headers=views.MODEL_COLUMNS, label="Served models", interactive=False,
                          elem_id="admin-models")

    def refresh(key: str | None) -> list[Any]:
        lines: list[str] = []
        workers_rows: list[list[Any]] = []
        queue_rows: list[list[Any]] = []
        model_rows: list[list[Any]] = []
        try:
            workers_rows = [views.worker_row(w) for w in views.listing(ctx.client.admin_workers(key=key))]
            ready = sum(r[1] in ("ready", "busy") for r in workers_rows)
            lines.append(f"**Workers:** {len(workers_rows)} registered, {ready} ready or busy"
                         + ("" if workers_rows else " (start one: `echo4o worker`)"))
        except ApiError as err:
            lines.append(_note(err))
        try:
            body = ctx.client.admin_queue(key=key)
            jobs = views.listing(body)
            jobs.sort(key=lambda j: (j.get("status") != "running", j.get("queue_position") or 0))
            queue_rows = [views.admin_job_row(j) for j in jobs]
            if isinstance(body, dict):
                lines.append(f"**Queue:** {body.get('running', '?')} running, {body.get('queued', '?')} queued")
        except ApiError as err:
            lines.append(_note(err))
        try:
            model_rows = [views.model_row(m) for m in views.listing(ctx.client.models(key=key))]
        except ApiError as err:
            lines.append(_note(err))
        return ["  \n".join(lines), workers_rows or _empty(views.WORKER_COLUMNS),
                queue_rows or _empty(views.ADMIN_JOB_COLUMNS), model_rows or _empty(views.MODEL_COLUMNS)]

    return SectionHandle([note, workers, queue, models], refresh)


def _build_all_jobs(ctx: AdminContext) -> SectionHandle:
    status = gr.Dropdown([ANY_STATUS, *ctx.statuses], value=ANY_STATUS, label="Status", scale=0, min_width=180,
                         elem_id="admin-jobs-status")
    table = gr.Dataframe(headers=views.ADMIN_JOB_COLUMNS, label="All users' jobs (newest first)",
                         interactive=False, elem_id="admin-jobs", wrap=True)

    def fetch(key: str | None, wanted: str = ANY_STATUS) -> list[Any]:
        try:
            body = ctx.client.list_jobs(key=key, all_users=True, status=None if wanted == ANY_STATUS else wanted,
                                        limit=100)
        except ApiError as err:
            gr.Warning(err.readable())
            return [_empty(views.ADMIN_JOB_COLUMNS)]
        rows = [views.admin_job_row(j) for j in views.listing(body)]
        return [rows or _empty(views.ADMIN_JOB_COLUMNS)]

    status.change(fetch, [ctx.key_state, status], [table], api_visibility="private")
    return SectionHandle([table], lambda key: fetch(key))


# Sections of their own modules (fine-tuning, benchmarks) are appended below.
def _build_finetune(ctx: AdminContext) -> SectionHandle:
    from frontend_gradio.admin_finetune import build  # its own module (it imports this one's classes)

    return build(ctx)


ADMIN_SECTIONS: list[AdminSection] = [
    AdminSection("Workers, queue and models", _build_overview),
    AdminSection("All jobs", _build_all_jobs),
]


def _build_benchmarks(ctx: AdminContext) -> SectionHandle:
    from frontend_gradio.admin_benchmarks import build  # its own module (it imports this one's classes)

    return build(ctx)


ADMIN_SECTIONS.append(AdminSection("Benchmarks", _build_benchmarks))
ADMIN_SECTIONS.append(AdminSection("Fine-tuning and versions", _build_finetune))


def build_admin_tab(ctx: AdminContext) -> tuple[gr.Button, list[Any], Callable[[str | None], list[Any]]]:
    """Create the sections inside the current tab; returns the refresh button, every output, and one
    function that refreshes them all."""
    with gr.Row():
        gr.Markdown("Everything here needs an admin key.", elem_classes="e4o-hint")
        refresh_btn = gr.Button("Refresh", variant="secondary", scale=0, min_width=120, elem_id="admin-refresh")
    handles: list[SectionHandle] = []
    with gr.Tabs():
        for section in ADMIN_SECTIONS:
            with gr.Tab(section.title):
                handles.append(section.build(ctx))
    outputs = [o for h in handles for o in h.outputs]

    def refresh_all(key: str | None) -> list[Any]:
        values: list[Any] = []
        for h in handles:
            values.extend(h.refresh(key) if h.refresh else [gr.skip() for _ in h.outputs])
        return values

    return refresh_btn, outputs, refresh_all
