"""The admin tab's benchmark section: start a run, follow it, list runs, open a report, compare two runs.

Everything goes through the gateway's ``/admin/benchmarks`` routes (docs/benchmarks.md): the form's choices come
from ``GET /admin/benchmarks/options``; a started run is followed by reading ``GET /admin/benchmarks/{id}`` every
second (its image jobs by status are live; the run's own progress says generate n/N, then judge n/N); a report is
``GET /admin/benchmarks/{id}/report?inline=true`` shown in a frame; the compare view puts two runs' summaries
(``?format=json``) side by side.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from frontend_gradio import views
from frontend_gradio.admin import AdminContext, SectionHandle
from frontend_gradio.client import ApiError

RUN_COLUMNS = ["id", "status", "suite", "limit", "model", "progress", "overall", "created"]
#: Seconds between two reads of a followed run.
FOLLOW_POLL_S = 1.0
TERMINAL = ("succeeded", "failed", "cancelled")


def _note(err: ApiError) -> str:
    return f"⚠️ {err.readable()}"


def progress_text(run: dict[str, Any]) -> str:
    """One line of a run's state: status, images made of all, verdicts, the error or the score."""
    progress = run.get("progress") or {}
    detail = progress.get("detail") or {}
    jobs = run.get("image_jobs") or {}
    total = detail.get("images") or (progress.get("total") if progress.get("stage") == "generate" else None)
    made = max(jobs.get("succeeded", 0), detail.get("generated", 0))
    parts = [f"Run `{run['id']}` ({run.get('suite')}): **{run.get('status')}**"]
    if total:
        parts.append(f"generated {made}/{total}")
    if "to_judge" in detail:
        parts.append(f"judged {detail.get('judged', 0)}/{detail['to_judge']}")
    if run.get("overall") is not None:
        parts.append(f"overall {run['overall']:.3f}")
    if run.get("error"):
        parts.append(f"⚠️ {run['error'].get('code')}: {run['error'].get('message')}")
    return " · ".join(parts)


def run_row(run: dict[str, Any]) -> list[Any]:
    progress = run.get("progress") or {}
    step = f"{progress.get('stage') or ''} {progress.get('step') or 0}/{progress.get('total') or '?'}"
    overall = run.get("overall")
    return [run.get("id", ""), run.get("status", ""), run.get("suite", ""), run.get("limit") or "all",
            run.get("model_version") or "", step.strip(), "" if overall is None else f"{overall:.3f}",
            views.when(run.get("created_at"))]


def report_frame(report_html: str) -> str:
    """The report as a frame of its own (its styles stay inside it)."""
    return (f"<iframe id='bench-report-frame' title='benchmark report' srcdoc=\"{html.escape(report_html)}\" "
            "style='width:100%;height:900px;border:1px solid #ddd'></iframe>")


def compare_markdown(a: dict[str, Any], b: dict[str, Any], a_id: str, b_id: str) -> str:
    """Two runs' overall and per-group scores side by side, with the change from the first to the second."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def delta(x: Any, y: Any) -> str:
        return "n/a" if x is None or y is None else f"{y - x:+.3f}"

    lines = [f"| | run `{a_id[:12]}` ({a.get('suite')}) | run `{b_id[:12]}` ({b.get('suite')}) | change |",
             "|---|---|---|---|",
             f"| **overall** | {fmt(a.get('overall'))} | {fmt(b.get('overall'))} | "
             f"{delta(a.get('overall'), b.get('overall'))} |"]
    ga, gb = a.get("groups") or {}, b.get("groups") or {}
    for name in [*ga, *(g for g in gb if g not in ga)]:
        lines.append(f"| {name} | {fmt(ga.get(name))} | {fmt(gb.get(name))} | {delta(ga.get(name), gb.get(name))} |")
    if a.get("suite") != b.get("suite"):
        lines.append("\n⚠️ the runs measure different suites: their scores do not compare.")
    return "\n".join(lines)


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "", 0) else int(value)


def build(ctx: AdminContext) -> SectionHandle:
    with gr.Row():
        suite = gr.Dropdown([], label="Suite", elem_id="bench-suite", allow_custom_value=True)
        model = gr.Dropdown([], label="Model version (empty: the current one)", elem_id="bench-model",
                            allow_custom_value=True)
        limit = gr.Number(1, label="Prompts per group (empty: all)", precision=0, elem_id="bench-limit")
        images = gr.Number(None, label="Images per prompt (0: the paper's)", precision=0,
                           elem_id="bench-images")
    with gr.Row():
        size = gr.Number(None, label="Image side in px (0: the paper's 1024)", precision=0,
                         elem_id="bench-size")
        steps = gr.Number(None, label="Steps (0: the paper's 50)", precision=0, elem_id="bench-steps")
        prompts = gr.Textbox(label="Prompt file in the data dir (custom; others: the pinned file)",
                             elem_id="bench-prompts")
    with gr.Row():
        judge_url = gr.Textbox(label="Judge URL (empty: the gateway's ECHO4O_JUDGE_URL)", elem_id="bench-judge-url")
        judge_model = gr.Textbox(label="Judge model (empty: ECHO4O_JUDGE_MODEL)", elem_id="bench-judge-model")
        compare_to = gr.Textbox(label="Compare to run (id, optional)", elem_id="bench-compare-to")
        start = gr.Button("Start run", variant="primary", scale=0, min_width=140, elem_id="bench-start")
    status = gr.Markdown("", elem_id="bench-progress")
    runs = gr.Dataframe(headers=RUN_COLUMNS, label="Runs (newest first)", interactive=False, elem_id="bench-runs",
                        wrap=True)
    with gr.Row():
        run_id = gr.Textbox(label="Run id", elem_id="bench-run-id")
        open_btn = gr.Button("Open report", scale=0, min_width=140, elem_id="bench-open")
    with gr.Row():
        cmp_a = gr.Textbox(label="Compare: first run id", elem_id="bench-compare-a")
        cmp_b = gr.Textbox(label="second run id", elem_id="bench-compare-b")
        cmp_btn = gr.Button("Compare", scale=0, min_width=140, elem_id="bench-compare")
    comparison = gr.Markdown("", elem_id="bench-comparison")
    report = gr.HTML("", elem_id="bench-report")

    def list_rows(key: str | None) -> list[list[Any]]:
        body = ctx.client.request("GET", "admin/benchmarks", key=key, params={"limit": 50}).json()
        return [run_row(r) for r in views.listing(body)] or [["" for _ in RUN_COLUMNS]]

    def load_report(key: str | None, rid: str) -> str:
        text = ctx.client.request("GET", f"admin/benchmarks/{rid.strip()}/report", key=key,
                                  params={"inline": "true"}).text
        return report_frame(text)

    def start_run(key: str | None, suite_v: str, model_v: str, limit_v: Any, images_v: Any, size_v: Any,
                  steps_v: Any, prompts_v: str, judge_url_v: str, judge_model_v: str,
                  compare_v: str) -> Iterator[list[Any]]:
        body: dict[str, Any] = {"suite": suite_v, "limit": _int_or_none(limit_v),
                                "images_per_prompt": _int_or_none(images_v), "num_steps": _int_or_none(steps_v),
                                "model_version": model_v or None, "prompts": (prompts_v or "").strip() or None,
                                "judge_url": (judge_url_v or "").strip() or None,
                                "judge_model": (judge_model_v or "").strip() or None,
                                "compare_to": (compare_v or "").strip() or None}
        side = _int_or_none(size_v)
        if side is not None:
            body.update(height=side, width=side)
        body = {k: v for k, v in body.items() if v is not None}
        try:
            created = ctx.client.request("POST", "admin/benchmarks", key=key, json=body).json()
        except ApiError as err:
            yield [_note(err), gr.skip(), gr.skip(), gr.skip()]
            return
        rid = created["id"]
        yield [f"Run `{rid}` queued", rid, gr.skip(), list_rows(key)]
        while True:
            try:
                run = ctx.client.request("GET", f"admin/benchmarks/{rid}", key=key).json()
            except ApiError as err:
                yield [_note(err), rid, gr.skip(), gr.skip()]
                return
            if run.get("status") in TERMINAL:
                break
            yield [progress_text(run), rid, gr.skip(), gr.skip()]
            time.sleep(FOLLOW_POLL_S)
        frame: Any = gr.skip()
        if run.get("status") == "succeeded":
            try:
                frame = load_report(key, rid)
            except ApiError as err:
                frame = f"<p>{html.escape(_note(err))}</p>"
        yield [progress_text(run), rid, frame, list_rows(key)]

    def open_report(key: str | None, rid: str) -> list[Any]:
        if not (rid or "").strip():
            return ["⚠️ give a run id (from the table)", gr.skip()]
        try:
            run = ctx.client.request("GET", f"admin/benchmarks/{rid.strip()}", key=key).json()
            if run.get("status") != "succeeded":
                return [progress_text(run), gr.skip()]
            return [progress_text(run), load_report(key, rid)]
        except ApiError as err:
            return [_note(err), gr.skip()]

    def compare(key: str | None, a: str, b: str) -> str:
        if not (a or "").strip() or not (b or "").strip():
            return "⚠️ give two run ids"
        try:
            sa, sb = (ctx.client.request("GET", f"admin/benchmarks/{r.strip()}/report", key=key,
                                         params={"format": "json"}).json() for r in (a, b))
        except ApiError as err:
            return _note(err)
        return compare_markdown(sa, sb, a.strip(), b.strip())

    inputs = [ctx.key_state, suite, model, limit, images, size, steps, prompts, judge_url, judge_model, compare_to]
    start.click(start_run, inputs, [status, run_id, report, runs], api_visibility="private")
    open_btn.click(open_report, [ctx.key_state, run_id], [status, report], api_visibility="private")
    cmp_btn.click(compare, [ctx.key_state, cmp_a, cmp_b], [comparison], api_visibility="private")

    def refresh(key: str | None) -> list[Any]:
        try:
            options = ctx.client.request("GET", "admin/benchmarks/options", key=key).json()
            rows = list_rows(key)
        except ApiError as err:
            return [gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), _note(err)]
        suites = options.get("suites") or []
        return [gr.Dropdown(choices=suites, value=suites[0] if suites else None),
                gr.Dropdown(choices=options.get("model_versions") or []),
                gr.Textbox(placeholder=options.get("judge_url") or "no judge configured: give its URL"),
                gr.Textbox(placeholder=options.get("judge_model") or ""), rows, ""]

    return SectionHandle([suite, model, judge_url, judge_model, runs, comparison], refresh)
