"""Pure formatting: the status/progress box, table rows and the page's stylesheet. No Gradio, no HTTP."""

from __future__ import annotations

import html
from typing import Any

# Every status box carries data-state, so that people (colour) and tests (selectors) can read it.
STATES = ("idle", "submitting", "queued", "running", "done", "failed", "cancelled", "error")

CSS = """
.e4o-header h1 { margin-bottom: 0; }
.e4o-conn { font-size: 0.9em; opacity: 0.85; }
.e4o-status { border-radius: 8px; padding: 10px 12px; border: 1px solid var(--border-color-primary);
  background: var(--background-fill-secondary); font-size: 0.95em; }
.e4o-status .e4o-line { display: flex; justify-content: space-between; gap: 8px; }
.e4o-status .e4o-job { font-family: var(--font-mono); opacity: 0.7; font-size: 0.85em; }
.e4o-bar { margin-top: 8px; height: 10px; border-radius: 5px; background: var(--border-color-primary);
  overflow: hidden; }
.e4o-bar > div { height: 100%; background: var(--color-accent); transition: width 0.3s ease; }
.e4o-status[data-state="done"] { border-color: #3a9d5d; }
.e4o-status[data-state="done"] .e4o-bar > div { background: #3a9d5d; }
.e4o-status[data-state="failed"], .e4o-status[data-state="error"] { border-color: #d64545;
  color: #b42318; background: #fef3f2; }
.e4o-status[data-state="cancelled"] { border-color: #b0b0b0; opacity: 0.85; }
.e4o-hint { font-size: 0.85em; opacity: 0.75; }
"""


def status_html(state: str, text: str, *, job_id: str | None = None, step: int | None = None,
                total: int | None = None) -> str:
    """The status box: one line of text, the job id, and a progress bar while a job is known."""
    assert state in STATES, state
    job = f'<span class="e4o-job">job {html.escape(job_id[:12])}</span>' if job_id else ""
    bar = ""
    if state in ("queued", "running", "done"):
        frac = 1.0 if state == "done" else (step / total if step and total else 0.0)
        bar = f'<div class="e4o-bar"><div style="width:{frac * 100:.1f}%"></div></div>'
    step_attr = f' data-step="{step}" data-total="{total}"' if step is not None and total else ""
    return (
        f'<div class="e4o-status" data-state="{state}"{step_attr}>'
        f'<div class="e4o-line"><span class="e4o-text">{html.escape(text)}</span>{job}</div>{bar}</div>'
    )


def short(text: Any, n: int = 60) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def when(ts: Any) -> str:
    """``2026-11-26T13:05:01.123Z`` -> ``2026-11-26 13:05:01``."""
    if not ts:
        return ""
    s = str(ts).replace("T", " ")
    return s[:19]


def size_of(params: dict[str, Any]) -> str:
    if params.get("height") and params.get("width"):
        return f"{params['height']}x{params['width']}"
    return str(params.get("aspect_ratio") or ("ref" if params.get("references") else ""))


JOB_COLUMNS = ["created", "id", "kind", "status", "prompt", "size", "steps", "seed", "images"]
ADMIN_JOB_COLUMNS = ["created", "id", "kind", "status", "queue", "progress", "prompt", "worker"]


def job_seed(job: dict[str, Any]) -> Any:
    result = job.get("result") or {}
    return result.get("seed", (job.get("params") or {}).get("seed", ""))


def job_row(job: dict[str, Any]) -> list[Any]:
    params = job.get("params") or {}
    result = job.get("result") or {}
    return [
        when(job.get("created_at")),
        str(job.get("id", ""))[:12],
        job.get("kind", ""),
        job.get("status", ""),
        short(params.get("prompt"), 70),
        size_of(params),
        params.get("num_steps", ""),
        job_seed(job),
        len(result.get("images") or []),
    ]


def progress_text(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    if p.get("total"):
        return f"{p.get('stage') or ''} {p.get('step') or 0}/{p['total']}".strip()
    return str(p.get("stage") or "")


def admin_job_row(job: dict[str, Any]) -> list[Any]:
    params = job.get("params") or {}
    return [
        when(job.get("created_at")),
        str(job.get("id", ""))[:12],
        job.get("kind", ""),
        job.get("status", ""),
        job.get("queue_position") or "",
        progress_text(job),
        short(params.get("prompt"), 50),
        job.get("worker") or "",
    ]


MODEL_COLUMNS = ["id", "source", "workers ready"]


def model_row(m: dict[str, Any]) -> list[Any]:
    return [m.get("id", ""), m.get("source", ""), m.get("workers_ready", "")]


WORKER_COLUMNS = ["id", "status", "queues", "model", "device", "attention", "heartbeat"]


def worker_row(w: dict[str, Any]) -> list[Any]:
    queues = w.get("queues")
    if isinstance(queues, list):
        queues = ", ".join(map(str, queues))
    return [
        w.get("id", ""),
        w.get("status", ""),
        queues or "",
        w.get("model_version", ""),
        w.get("device", ""),
        w.get("attention", ""),
        when(w.get("heartbeat_at")),
    ]


def listing(body: Any) -> list[dict[str, Any]]:
    """The list inside a listing answer: ``{"data": [...]}``, a bare list, or ``{"workers": [...]}``-like."""
    if isinstance(body, list):
        return [x for x in body if isinstance(x, dict)]
    if isinstance(body, dict):
        for k in ("data", "items", "workers", "models", "jobs"):
            if isinstance(body.get(k), list):
                return [x for x in body[k] if isinstance(x, dict)]
    return []


def model_ids(body: Any) -> list[str]:
    ids = []
    for m in listing(body):
        ident = m.get("id") or m.get("version") or m.get("name")
        if ident:
            ids.append(str(ident))
    return ids
