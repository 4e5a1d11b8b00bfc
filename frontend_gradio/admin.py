"""The admin tab: one sub-tab per :class:`AdminSection`, shown only to a session whose key is an admin key.

To add a panel (the fine-tuning and benchmark forms, once the gateway serves ``POST /admin/finetune`` and
``POST /admin/benchmarks``), write a function ``build(ctx) -> SectionHandle`` that creates its components
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


@dataclass
class AdminContext:
    client: GatewayClient
    key_state: gr.State


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


def _build_overview(ctx: AdminContext) -> SectionHandle:
    note = gr.Markdown("", elem_id="admin-note")
    with gr.Row():
        with gr.Column(scale=3):
            workers = gr.Dataframe(headers=views.WORKER_COLUMNS, label="Workers", interactive=False,
                                   elem_id="admin-workers", wrap=True)
        with gr.Column(scale=2):
            queue = gr.JSON(label="Queue", elem_id="admin-queue")
    models = gr.JSON(label="Served models", elem_id="admin-models")

    def refresh(key: str | None) -> list[Any]:
        problems = []
        rows: list[list[Any]] = []
        queue_body: Any = None
        models_body: Any = None
        try:
            rows = [views.worker_row(w) for w in views.listing(ctx.client.admin_workers(key=key))]
        except ApiError as err:
            problems.append(_note(err))
        try:
            queue_body = ctx.client.admin_queue(key=key)
        except ApiError as err:
            problems.append(_note(err))
        try:
            models_body = ctx.client.models(key=key)
        except ApiError as err:
            problems.append(_note(err))
        summary = f"{len(rows)} worker(s): " + (
            ", ".join(f"{r[0]} {r[1]}" for r in rows) if rows else "none registered (start one: `echo4o worker`)"
        )
        return ["\n\n".join([summary, *problems]), rows or [["" for _ in views.WORKER_COLUMNS]], queue_body,
                models_body]

    return SectionHandle([note, workers, queue, models], refresh)


def _build_all_jobs(ctx: AdminContext) -> SectionHandle:
    status = gr.Dropdown(["any", "queued", "running", "succeeded", "failed", "cancelled"], value="any",
                         label="Status", scale=0, min_width=180)
    table = gr.Dataframe(headers=views.ADMIN_JOB_COLUMNS, label="All users' jobs (newest first)",
                         interactive=False, elem_id="admin-jobs", wrap=True)

    def fetch(key: str | None, wanted: str = "any") -> list[Any]:
        try:
            body = ctx.client.list_jobs(key=key, all_users=True, status=None if wanted == "any" else wanted,
                                        limit=100)
        except ApiError as err:
            gr.Warning(err.readable())
            return [[["" for _ in views.ADMIN_JOB_COLUMNS]]]
        rows = [views.admin_job_row(j) for j in views.listing(body)]
        return [rows or [["" for _ in views.ADMIN_JOB_COLUMNS]]]

    status.change(fetch, [ctx.key_state, status], [table])
    return SectionHandle([table], lambda key: fetch(key))


# Fine-tuning and benchmark sections append here when the gateway has their routes.
ADMIN_SECTIONS: list[AdminSection] = [
    AdminSection("Workers, queue and models", _build_overview),
    AdminSection("All jobs", _build_all_jobs),
]


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
