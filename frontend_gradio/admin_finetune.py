"""The admin tab's "Fine-tuning and versions" section: start a run (``POST /admin/finetune``), watch its loss
curve live (the run's event stream, whose progress detail carries ``losses``), list the model versions with
their manifests (``GET /admin/models``) and promote or roll back (``POST /admin/models/{ref}/promote``,
``POST /admin/models/rollback``). An HTTP client only, like the rest of the UI: the mode choices and step
bound come from ``GET /parameters``. Refreshing the tab shows the newest run of the session's key (its status
and curve as last reported), so a reloaded page finds a run it did not start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

from frontend_gradio.admin import AdminContext, SectionHandle
from frontend_gradio.client import ApiError

VERSION_COLUMNS = ["ref", "current", "source", "steps", "final loss", "parent", "created"]
PRIVATE = {"api_visibility": "private"}


def loss_frame(points: list[list[float]] | None) -> pd.DataFrame:
    """The ``[step, loss]`` points of a run as the plot's data."""
    points = points or []
    # typed columns even when empty: the plot takes its axis types from the first frame it gets
    return pd.DataFrame({"step": pd.Series([int(p[0]) for p in points], dtype="int64"),
                         "loss": pd.Series([float(p[1]) for p in points], dtype="float64")})


def progress_line(data: dict[str, Any]) -> str:
    """One line of a run's progress: step, loss, lr, samples/s, ETA and skipped rows."""
    detail = data.get("detail") or {}
    parts = [f"step {data.get('step', '?')}/{data.get('total', '?')}"]
    if "loss" in detail:
        parts.append(f"loss {detail['loss']:.4f}")
    if "lr" in detail:
        parts.append(f"lr {detail['lr']:.2e}")
    if "samples_per_s" in detail:
        parts.append(f"{detail['samples_per_s']:.2f} samples/s")
    if "eta_s" in detail:
        parts.append(f"ETA {detail['eta_s']:.0f} s")
    if detail.get("skipped_rows"):
        parts.append(f"{detail['skipped_rows']} rows skipped")
    return " · ".join(parts)


def finetune_request(dataset: str, mode: str, steps: float | None, lr: str, extra: str) -> dict[str, Any]:
    """The body of ``POST /admin/finetune`` from the form; ``extra`` is a JSON object of further fields (token
    budget, image sizes, save_every, output_version, ...). A ValueError names the form field at fault."""
    body: dict[str, Any] = {"dataset": dataset.strip(), "mode": mode}
    if steps is not None:
        body["steps"] = int(steps)
    if lr and lr.strip():
        try:
            body["lr"] = float(lr)
        except ValueError:
            raise ValueError(f"learning rate: {lr!r} is not a number (e.g. 2e-5)") from None
    if extra and extra.strip():
        try:
            more = json.loads(extra)
        except ValueError as exc:
            raise ValueError(f"more fields: not JSON ({exc})") from None
        if not isinstance(more, dict):
            raise ValueError('more fields: give a JSON object, e.g. {"save_every": 100}')
        body.update(more)
    return body


def run_summary(job: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    """A fine-tuning job's status line and loss curve as ``GET /jobs/{id}`` shows it."""
    progress = job.get("progress") or {}
    if job.get("status") == "succeeded":
        details = (job.get("result") or {}).get("details") or {}
        return (f"last run `{job['id']}`: done, version `{details.get('version')}` ({details.get('steps')} steps)",
                loss_frame(details.get("losses")))
    if job.get("status") == "failed":
        error = job.get("error") or {}
        return f"last run `{job['id']}`: ⚠️ failed ({error.get('code')}): {error.get('message')}", loss_frame(
            (progress.get("detail") or {}).get("losses"))
    line = progress_line(progress) if job.get("status") == "running" else job.get("status", "")
    return f"last run `{job['id']}`: {line}", loss_frame((progress.get("detail") or {}).get("losses"))


def version_rows(body: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for v in body.get("data") or []:
        manifest = v.get("manifest") or {}
        loss = manifest.get("final_loss")
        rows.append([v.get("ref"), "✓" if v.get("current") else "", v.get("source") or "", manifest.get("steps", ""),
                     f"{loss:.4f}" if isinstance(loss, float) else "", manifest.get("parent") or "",
                     (v.get("created_at") or "")[:19]])
    return rows


def build(ctx: AdminContext) -> SectionHandle:
    """The section's components and handlers; refreshing it reloads the versions and the newest run."""
    spec = ctx.client.parameters()["finetune"]  # the page itself needs the gateway to answer (see app.py)
    gr.Markdown("Start a fine-tuning run of the current version. The dataset is an absolute path inside the "
                "gateway's data dir (or ECHO4O_DATASETS_DIR) or a Hub dataset id; empty fields take the "
                "trainer's defaults.", elem_classes="e4o-hint")
    with gr.Row():
        dataset = gr.Textbox(label="Dataset", placeholder="/data/datasets/my-set or owner/name", scale=3,
                             elem_id="ft-dataset")
        mode = gr.Radio(spec["modes"], value=spec["modes"][0], label="Mode", scale=1, elem_id="ft-mode")
        steps = gr.Number(label="Steps", value=None, precision=0, minimum=1, maximum=spec["steps_max"], scale=1,
                          elem_id="ft-steps")
        lr = gr.Textbox(label="Learning rate", placeholder="2e-5", scale=1, elem_id="ft-lr")
    extra = gr.Textbox(label="More fields (JSON object, optional)", lines=1, elem_id="ft-extra",
                       placeholder='{"save_every": 100, "output_version": "v2"}')
    with gr.Row():
        start = gr.Button("Start fine-tuning", variant="primary", scale=0, min_width=180, elem_id="ft-start")
        cancel = gr.Button("Cancel run", variant="stop", scale=0, min_width=140, elem_id="ft-cancel")
    status = gr.Markdown("", elem_id="ft-status")
    plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Training loss", height=260,
                       elem_id="ft-loss")
    job_state = gr.State(None)

    versions = gr.Dataframe(headers=VERSION_COLUMNS, label="Model versions", interactive=False, wrap=True,
                            elem_id="ft-versions")
    with gr.Row():
        chosen = gr.Dropdown([], label="Version", scale=3, elem_id="ft-version")
        promote = gr.Button("Promote", variant="primary", scale=0, min_width=120, elem_id="ft-promote")
        rollback = gr.Button("Roll back", variant="secondary", scale=0, min_width=120, elem_id="ft-rollback")
    versions_note = gr.Markdown("", elem_id="ft-versions-note")
    manifest = gr.JSON(label="Manifest", open=True, elem_id="ft-manifest")
    models_cache = gr.State({})

    def fetch_versions(key: str | None, selected: str | None = None) -> list[Any]:
        try:
            body = ctx.client.admin_models(key=key)
        except ApiError as err:
            return [[["" for _ in VERSION_COLUMNS]], gr.Dropdown(choices=[]), f"⚠️ {err.readable()}", None, {}]
        refs = [v["ref"] for v in body.get("data") or []]
        manifests = {v["ref"]: v.get("manifest") for v in body.get("data") or []}
        pick = selected if selected in refs else (refs[-1] if refs else None)
        note = f"**Current:** `{body.get('current')}` (configured: `{body.get('configured')}`)"
        return [version_rows(body) or [["" for _ in VERSION_COLUMNS]], gr.Dropdown(choices=refs, value=pick), note,
                manifests.get(pick), manifests]

    def run(key: str | None, dataset_v: str, mode_v: str, steps_v: float | None, lr_v: str,
            extra_v: str) -> Iterator[list[Any]]:
        try:
            job = ctx.client.submit_finetune(finetune_request(dataset_v, mode_v, steps_v, lr_v, extra_v), key=key)
        except ValueError as err:
            yield [f"⚠️ {err}", gr.skip(), None]
            return
        except ApiError as err:
            yield [f"⚠️ {err.readable()}", gr.skip(), None]
            return
        yield [f"queued: job `{job['id']}`", loss_frame(None), job["id"]]
        try:
            for event in ctx.client.events(job, key=key):
                if event.name == "queued":
                    yield [f"queued (position {event.data.get('position')}): job `{job['id']}`", gr.skip(), job["id"]]
                elif event.name == "progress":
                    detail = event.data.get("detail") or {}
                    frame = loss_frame(detail["losses"]) if detail.get("losses") else gr.skip()
                    yield [progress_line(event.data), frame, job["id"]]
                elif event.name == "done":
                    details = (event.data.get("result") or {}).get("details") or {}
                    yield [f"done: version `{details.get('version')}` ({details.get('steps')} steps, final loss "
                           f"{details.get('final_loss', float('nan')):.4f}); promote it below",
                           loss_frame(details.get("losses")) if details.get("losses") else gr.skip(), None]
                elif event.name == "failed":
                    yield [f"⚠️ failed ({event.data.get('code')}): {event.data.get('message')}", gr.skip(), None]
                elif event.name == "cancelled":
                    yield ["cancelled", gr.skip(), None]
        except ApiError as err:
            yield [f"⚠️ {err.readable()}", gr.skip(), None]

    def stop(key: str | None, job_id: str | None) -> str:
        if not job_id:
            return "no run to cancel"
        try:
            ctx.client.cancel(job_id, key=key)
        except ApiError as err:
            return f"⚠️ {err.readable()}"
        return f"cancel requested for job `{job_id}`"

    def do_promote(key: str | None, ref: str | None) -> list[Any]:
        if not ref:
            gr.Warning("choose a version first")
            return fetch_versions(key)
        try:
            ctx.client.promote_model(ref, key=key)
        except ApiError as err:
            gr.Warning(err.readable())
        return fetch_versions(key, ref)

    def do_rollback(key: str | None, ref: str | None) -> list[Any]:
        try:
            ctx.client.rollback_model(key=key)
        except ApiError as err:
            gr.Warning(err.readable())
        return fetch_versions(key, ref)

    version_outputs = [versions, chosen, versions_note, manifest, models_cache]
    # after a run, the list shows the newest version (the run's own when it succeeded)
    start.click(run, [ctx.key_state, dataset, mode, steps, lr, extra], [status, plot, job_state], **PRIVATE).then(
        lambda key: fetch_versions(key), [ctx.key_state], version_outputs, **PRIVATE)
    cancel.click(stop, [ctx.key_state, job_state], [status], **PRIVATE)
    promote.click(do_promote, [ctx.key_state, chosen], version_outputs, **PRIVATE)
    rollback.click(do_rollback, [ctx.key_state, chosen], version_outputs, **PRIVATE)
    chosen.change(lambda ref, cache: (cache or {}).get(ref), [chosen, models_cache], [manifest], **PRIVATE)
    def refresh(key: str | None) -> list[Any]:
        values = fetch_versions(key)
        try:
            jobs = ctx.client.list_jobs(key=key, limit=50).get("data") or []
        except ApiError as err:
            return [*values, f"⚠️ {err.readable()}", gr.skip()]
        run = next((j for j in jobs if j.get("kind") == "finetune"), None)
        return [*values, *(run_summary(run) if run is not None else (gr.skip(), gr.skip()))]

    return SectionHandle([*version_outputs, status, plot], refresh)

