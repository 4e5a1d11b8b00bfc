"""A job's Server-Sent Events (``GET /jobs/{id}/events``), from the snapshots of its row that the process's
:class:`~backend.services.watch_hub.WatchHub` shares between all the watchers of the job."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette.event import ensure_bytes

from backend.services.blocking import in_session
from backend.services.views import public_job
from backend.services.watch_hub import Snapshot, WatchHub, hub_for
from echo4o.jobs import PAUSED_STAGE
from echo4o.settings import Settings

SEP = "\r\n"  # sse-starlette's line separator


class StepCounter:
    """Which step numbers the stream has not reported yet, from one row read to the next.

    A new phase of a running job that counts anew (a benchmark's judging after its generating: the step went back
    or the total changed) reports its steps from 1 again; a phase that goes on counting (an image job's encoding
    after its last sampling step) repeats none.
    """

    def __init__(self) -> None:
        self.step = 0
        self.stage: str | None = None
        self.total: int | None = None

    @classmethod
    def resume(cls, last_event_id: str | None) -> StepCounter:
        """A counter that goes on after the ``progress`` event with id ``last_event_id`` (see :func:`event_id`);
        a fresh one when it is None or not such an id."""
        counter = cls()
        if not last_event_id:
            return counter
        step, _, rest = last_event_id.partition(":")
        total, _, stage = rest.partition(":")
        if not step.isdigit() or not (total == "" or total.isdigit()) or ":" not in last_event_id:
            return counter
        counter.step, counter.total, counter.stage = int(step), int(total) if total else None, stage or None
        return counter

    def advance(self, status: str, stage: str | None, step: int, total: int | None) -> range:
        if status == "running":
            if stage != self.stage and self.stage is not None and (step < self.step or total != self.total):
                self.step = 0
            self.stage, self.total = stage, total
        if status not in ("running", "succeeded") or not total or step <= self.step:
            return range(0)
        new, self.step = range(self.step + 1, step + 1), step
        return new


def _paused_event(snap: Snapshot) -> dict[str, str]:
    """The ``paused`` event of a job whose sampling waits for a preempting job (worker/preemption.py); no id: a
    client that reconnects learns of a pause still going on from the job's row."""
    event = snap.cache.get("paused")
    if event is None:
        job = snap.job
        assert job is not None
        data = {"step": job.progress_step or 0, "total": job.progress_total, **(job.progress_detail or {})}
        event = snap.cache["paused"] = {"event": "paused", "data": json.dumps(data)}
    return event


def event_id(step: int, total: int | None, stage: str | None) -> str:
    """The SSE id of a ``progress`` event: what :meth:`StepCounter.resume` needs to go on from it."""
    return f"{step}:{'' if total is None else total}:{stage or ''}"


def _progress_event(snap: Snapshot, s: int, with_preview: bool) -> dict[str, str]:
    """The ``progress`` event of step ``s`` seen in ``snap``, made once per snapshot for all its watchers."""
    key = ("progress", s, with_preview)
    event = snap.cache.get(key)
    if event is None:
        job = snap.job
        assert job is not None
        step, total = job.progress_step or 0, job.progress_total
        data: dict[str, Any] = {"step": s, "total": total, "stage": job.progress_stage}
        if s == step and job.progress_detail:
            data["detail"] = job.progress_detail
        if with_preview:
            data["preview"] = base64.b64encode(job.preview or b"").decode("ascii")
        event = snap.cache[key] = {"event": "progress", "id": event_id(s, total, job.progress_stage),
                                   "data": json.dumps(data)}
    return event


async def _end_event(settings: Settings, snap: Snapshot, base: str) -> dict[str, str] | None:
    """``done``, ``failed`` or ``cancelled`` for an ended job (None while it runs), made once per snapshot and base
    URL for all the watchers (``done`` carries the job's view, read in a worker thread)."""
    if not snap.ended:
        return None
    key = ("end", base)
    made = snap.cache.get(key)
    if made is None:
        made = snap.cache[key] = asyncio.ensure_future(_make_end_event(settings, snap, base))
    return await asyncio.shield(made)


async def _make_end_event(settings: Settings, snap: Snapshot, base: str) -> dict[str, str]:
    job = snap.job
    if job is None:
        return {"event": "failed", "data": json.dumps({"code": "not_found", "message": "the job was deleted"})}
    if job.status == "succeeded":
        view = await in_session(settings, lambda s: public_job(s, job, base))
        return {"event": "done", "data": view.model_dump_json()}
    if job.status == "failed":
        return {"event": "failed", "data": json.dumps({"code": job.error_code, "message": job.error_message})}
    return {"event": "cancelled", "data": json.dumps({"id": job.id})}


def encoded(snap: Snapshot, event: dict[str, str]) -> bytes:
    """``event`` as the bytes of an SSE message, encoded once per snapshot for all the watchers."""
    key = ("bytes", id(event))  # the event objects live in the same cache, so their ids stay theirs
    raw = snap.cache.get(key)
    if raw is None:
        raw = snap.cache[key] = ensure_bytes(event, SEP)
    return raw


def _queued_event(snap: Snapshot) -> dict[str, str]:
    event = snap.cache.get("queued")
    if event is None:
        event = snap.cache["queued"] = {"event": "queued", "data": json.dumps({"position": (snap.position or 0) + 1})}
    return event


async def job_events(
    settings: Settings, job_id: str, base: str, *, last_event_id: str | None = None, hub: WatchHub | None = None,
    as_bytes: bool = False,
) -> AsyncIterator[Any]:
    """Server-Sent Events for one job, from the snapshots of its row the process's watch hub shares.

    ``queued`` when the queue position changes; ``progress`` once for every step, with its stage (when several
    steps ended between two snapshots, each is reported, the preview and the job's progress detail going with the
    newest; a new stage counts from 1 again); ``paused`` (step, total, ``preempted_by``) when the job's sampling
    waits for a job of a higher priority (its steps then go on, in order); then ``done`` (the job), ``failed`` or
    ``cancelled``, and the stream ends. Each ``progress`` event has an id; a client that reconnects with it as
    ``last_event_id`` (``Last-Event-ID``) gets the steps after it, none again.

    The events are dicts (``event``, ``id``, ``data``), or with ``as_bytes`` their SSE encoding, shared by every
    watcher of the same snapshot (what the route sends: no per-watcher encoding), the events of one snapshot
    joined in one chunk (one write).
    """
    hub = hub or hub_for(settings)
    last_position: int | None = -1
    counter = StepCounter.resume(last_event_id)
    last_preview: bytes | None = None
    last_pause: Any = None
    async with hub.watch(job_id) as watch:
        async for snap in watch:
            events: list[dict[str, str]] = []
            job = snap.job
            if job is not None:
                if job.status == "queued" and snap.position != last_position:
                    last_position = snap.position
                    events.append(_queued_event(snap))
                step = job.progress_step or 0
                for s in counter.advance(job.status, job.progress_stage, step, job.progress_total):
                    with_preview = s == step and bool(job.preview) and job.preview != last_preview
                    if with_preview:
                        last_preview = job.preview
                    events.append(_progress_event(snap, s, with_preview))
                pause = job.progress_detail if job.status == "running" and job.progress_stage == PAUSED_STAGE else None
                if pause is not None and pause != last_pause:
                    events.append(_paused_event(snap))
                last_pause = pause
            end = await _end_event(settings, snap, base)
            if end is not None:
                events.append(end)
            if as_bytes and events:  # one write for what this snapshot brought (several steps, in a crowd)
                yield b"".join(encoded(snap, event) for event in events)
            else:
                for event in events:
                    yield event
            if end is not None:
                return
