"""One reader of watched job rows per gateway process, fanned out to every watcher (event streams, ``?wait``).

A watcher (an SSE stream, a ``?wait`` submit) does not read its job's row itself: it asks the process's
:class:`WatchHub` for the job's :class:`Snapshot` and waits for the next one. The hub reads a watched job's row
when something says it changed, once for all the watchers of that job in this process, and keeps the last
snapshot, so 1000 watchers of one job cost one read per change:

* Redis broker (:mod:`echo4o.notify`): one subscription per process to the jobs channel; a message about a
  watched job marks it for a re-read; a state change of any job also re-reads the watched queued jobs (their queue
  positions move). After a (re)subscription every watched job is re-read. A message that is lost anyway is made up
  for by the safety poll: a watched job not read for ``safety_poll_s`` seconds is read again.
* Any other broker (the embedded one), or while the subscription is down: the hub polls the rows of the watched
  jobs every ``poll_s`` seconds, in one statement for all of them.

Reads are batched (one ``SELECT ... WHERE id IN (...)`` for the jobs due, in a worker thread) and coalesced (a
notification that comes during a read makes one more read after it, however many there were). A snapshot whose
row did not change wakes no one; an ended (or deleted) job is not read again. The row stays the truth: a new
watcher starts from the current snapshot, or the row itself. A crowd (more than ``CROWD_WATCHERS`` watchers of one
job in the process) takes snapshots together, at most every ``CROWD_INTERVAL_S``: writing every step to every watcher
of a crowd would cost a socket write per step per watcher.

:func:`hub_for` gives the hub of the running event loop and a database: the one the app's lifespan registered
(persistent: subscribed from start to stop), or one made on first use that stops its tasks when its last watcher
leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from echo4o import notify
from echo4o.db import crud, get_sessionmaker
from echo4o.db.models import Job
from echo4o.jobs import TERMINAL_STATUSES
from echo4o.logging import get_logger
from echo4o.settings import Settings

log = get_logger(__name__)

#: Without notifications (embedded broker, or the subscription is down): how often watched rows are read.
POLL_S = 0.1
#: With notifications: a watched job not read for this long is read anyway (covers a lost message).
SAFETY_POLL_S = 3.0
#: Wait between two attempts to (re)subscribe.
RESUBSCRIBE_S = 1.0
#: How long a pub/sub read waits for a message before checking that the hub still runs.
LISTEN_TIMEOUT_S = 1.0
#: A job with more watchers than this in one process is a crowd: its watchers take a new snapshot together, at
#: most every ``CROWD_INTERVAL_S`` (the newest then; the steps in between still reach them, in one write each), so
#: the process writes to a crowd about once a second per watcher instead of once per step.
CROWD_WATCHERS = 100
CROWD_INTERVAL_S = 1.0


class Snapshot:
    """One read of a job's row, shared by all its watchers: ``job`` (detached; None once the row is gone),
    ``position`` (0-based queue position while queued) and ``version`` (grows with every change seen)."""

    __slots__ = ("version", "job", "position", "cache")

    def __init__(self, version: int, job: Job | None, position: int | None) -> None:
        self.version = version
        self.job = job
        self.position = position
        #: What watchers derive from this snapshot and may share (encoded events, the ended job's view).
        self.cache: dict[Any, Any] = {}

    @property
    def ended(self) -> bool:
        """The job has ended, or its row is gone: nothing will change any more."""
        return self.job is None or self.job.status in TERMINAL_STATUSES


def _key(job: Job | None, position: int | None) -> tuple:
    """What makes two reads of a row different (every write sets ``updated_at``)."""
    if job is None:
        return (None,)
    return (job.status, job.updated_at, job.progress_stage, job.progress_step, job.progress_total, position)


class _Entry:
    """A watched job: its watcher count, last snapshot and whether it must be read again; and, for a crowd, the
    newest snapshot released to it (one timer for the whole crowd, not one per watcher)."""

    __slots__ = ("job_id", "watchers", "progress_watchers", "snapshot", "key", "changed", "dirty", "for_position",
                 "last_read", "released", "released_at", "release_timer", "release_event")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.watchers = 0
        #: Watchers that show progress (event streams); a ``?wait`` only needs the end.
        self.progress_watchers = 0
        self.snapshot: Snapshot | None = None
        self.key: tuple | None = None
        self.changed = asyncio.Event()
        self.dirty = True
        #: Marked only because another job's change may have moved its queue position: read after the others.
        self.for_position = False
        self.last_read = float("-inf")
        #: The version a crowd may take, and when (loop time) it was released.
        self.released = 0
        self.released_at = float("-inf")
        self.release_timer: asyncio.TimerHandle | None = None
        self.release_event = asyncio.Event()

    def publish(self, snapshot: Snapshot, *, crowd_watchers: int, crowd_interval_s: float) -> None:
        """A new snapshot: wake the watchers waiting for one; a crowd gets it ``crowd_interval_s`` after its last
        release (at once for the end of the job, or when the job's watchers are no crowd)."""
        self.snapshot = snapshot
        event, self.changed = self.changed, asyncio.Event()
        event.set()
        if snapshot.ended or self.watchers <= crowd_watchers:
            self.release()
        elif self.release_timer is None:
            loop = asyncio.get_running_loop()
            self.release_timer = loop.call_at(max(loop.time(), self.released_at + crowd_interval_s), self.release)

    def release(self) -> None:
        """Let the crowd take the newest snapshot now."""
        if self.release_timer is not None:
            self.release_timer.cancel()
            self.release_timer = None
        self.released = self.snapshot.version if self.snapshot is not None else 0
        self.released_at = asyncio.get_running_loop().time()
        event, self.release_event = self.release_event, asyncio.Event()
        event.set()


class Watch:
    """One watcher's view of a job: ``async for snapshot in watch`` gives the current snapshot, then each newer
    one (a slow watcher skips to the newest; nothing is queued per watcher). In a crowd (more than the hub's
    ``crowd_watchers`` watchers of the job) the watchers take the newest snapshot together, at most every
    ``crowd_interval_s`` (one wake each per release); a new watcher gets the current one at once, and the end of
    the job is never held back."""

    def __init__(self, hub: WatchHub, entry: _Entry) -> None:
        self._hub = hub
        self._entry = entry
        self._seen = 0

    @property
    def snapshot(self) -> Snapshot | None:
        return self._entry.snapshot

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Snapshot:
        entry = self._entry
        while True:
            snap = entry.snapshot
            crowd = entry.watchers > self._hub.crowd_watchers
            if snap is not None and snap.version > self._seen:
                if not crowd or self._seen == 0 or snap.version <= entry.released:
                    self._seen = snap.version
                    return snap
                await entry.release_event.wait()  # the crowd's next release (scheduled with the snapshot)
                continue
            if snap is not None and snap.ended:
                raise StopAsyncIteration
            await (entry.release_event if crowd else entry.changed).wait()


class WatchHub:
    """Reads watched job rows for one process and fans the snapshots out (see the module docstring).

    ``on_rows_read(n)`` is called with the number of job rows each read took (the gateway counts them in
    ``echo4o_job_row_reads_total``); :attr:`row_reads` keeps the total.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_rows_read: Callable[[int], None] | None = None,
        persistent: bool = False,
        poll_s: float = POLL_S,
        safety_poll_s: float = SAFETY_POLL_S,
        crowd_watchers: int = CROWD_WATCHERS,
        crowd_interval_s: float = CROWD_INTERVAL_S,
    ) -> None:
        self.database_url = settings.database_url
        self.broker_url = settings.broker_url if notify.supports(settings.broker_url) else None
        self.on_rows_read = on_rows_read
        self.persistent = persistent
        self.poll_s = poll_s
        self.safety_poll_s = safety_poll_s
        self.crowd_watchers = crowd_watchers
        self.crowd_interval_s = crowd_interval_s
        self.row_reads = 0
        #: Notifications received (for tests and figures).
        self.messages = 0
        self._entries: dict[str, _Entry] = {}
        self._wake: asyncio.Event | None = None
        self._live = False  # subscribed: notifications arrive
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None

    # --- lifecycle ----------------------------------------------------------------------------------------
    @property
    def notifications(self) -> bool:
        """Whether this hub is told of changes (Redis) rather than polling."""
        return self.broker_url is not None

    @property
    def live(self) -> bool:
        """Subscribed right now (False: polling, or the subscription is being re-made)."""
        return self._live

    async def start(self) -> None:
        """Start the reader (and the subscription); idempotent. A persistent hub waits for its first attempt to
        subscribe (a few seconds at most), so the first watchers are notified rather than polled."""
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._reader(), name="echo4o-watch-reader"),
                       asyncio.create_task(self._ticker(), name="echo4o-watch-ticker")]
        if self.broker_url is not None:
            subscribed = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._subscriber(subscribed), name="echo4o-watch-subscriber"))
            if self.persistent:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await subscribed.wait()

    async def stop(self) -> None:
        """Stop every task of the hub (watchers still waiting keep their last snapshot)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._live = False

    # --- watching -----------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, *, progress: bool = True) -> AsyncIterator[Watch]:
        """Watch ``job_id`` for the duration of the block. ``progress=False``: the watcher needs only the job's
        state changes (a ``?wait``): while a job has no other watchers, a progress write is not read."""
        entry = self._entries.get(job_id)
        new = entry is None
        if entry is None:
            entry = self._entries[job_id] = _Entry(job_id)
        entry.watchers += 1
        entry.progress_watchers += progress
        if not self._tasks:
            await self.start()
        # a job watched already has a fresh snapshot (notifications or the poll keep it so), unless only for its
        # state: then its progress is read for the first watcher that shows it
        if new or (progress and entry.progress_watchers == 1):
            self._poke(entry)
        try:
            yield Watch(self, entry)
        finally:
            entry.watchers -= 1
            entry.progress_watchers -= progress
            if entry.watchers == 0 and self._entries.get(job_id) is entry:
                del self._entries[job_id]
                if not self._entries and not self.persistent:
                    await self.stop()

    def _poke(self, entry: _Entry, *, for_position: bool = False) -> None:
        """Have ``entry`` read at the reader's next round (a first watcher, or a notification); ``for_position``:
        only its queue position may have moved (another job started or ended), so it is read after the entries
        whose own row changed."""
        if entry.snapshot is not None and entry.snapshot.ended:
            return
        entry.for_position = for_position if not entry.dirty else entry.for_position and for_position
        entry.dirty = True
        if self._wake is not None:
            self._wake.set()

    def notified(self, job_id: str, status: str | None) -> None:
        """A notification: job ``job_id`` changed (``status``: its new status, None for progress). A progress
        write of a job only waited for (no watcher shows its progress) is not read: on a machine whose cores the
        sampling keeps busy, each read slows the job down."""
        self.messages += 1
        entry = self._entries.get(job_id)
        if entry is not None and (status is not None or entry.progress_watchers):
            self._poke(entry)
        if status is not None:  # a job started, ended or was requeued: queue positions may have moved
            for other in self._entries.values():
                if other is not entry and other.snapshot is not None and other.snapshot.job is not None \
                        and other.snapshot.job.status == "queued":
                    self._poke(other, for_position=True)

    # --- tasks --------------------------------------------------------------------------------------------
    async def _reader(self) -> None:
        """Read the rows of the entries marked dirty, in one statement per round, until cancelled. The entries
        whose own row changed are read first, and those marked only for their queue position after them: the
        answer to a job that ended does not wait for the queue positions of the jobs queued behind it."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            due = [e for e in self._entries.values() if e.dirty]
            if not due:
                continue
            first = [e for e in due if not e.for_position]
            rounds = [first, [e for e in due if e.for_position]] if 0 < len(first) < len(due) else [due]
            for e in due:
                e.dirty = e.for_position = False
            for i, batch in enumerate(rounds):
                if not await self._read(batch):
                    for e in (e for later in rounds[i + 1:] for e in later):
                        e.dirty = True
                    break

    async def _read(self, due: list[_Entry]) -> bool:
        """Read the rows of ``due`` in one statement and publish the changed ones; False when the read failed
        (they are marked for the next round, after a pause)."""
        assert self._wake is not None
        try:
            rows = await anyio.to_thread.run_sync(self._read_rows, [e.job_id for e in due])
        except Exception as exc:  # noqa: BLE001 - a failed read is retried by the next poll
            log.warning("watch hub: cannot read job rows", extra={"error": str(exc), "jobs": len(due)})
            await asyncio.sleep(self.poll_s)
            for e in due:
                e.dirty = True
            self._wake.set()
            return False
        self.row_reads += len(due)
        if self.on_rows_read is not None:
            self.on_rows_read(len(due))
        now = time.monotonic()
        for e in due:
            e.last_read = now
            job, position = rows.get(e.job_id, (None, None))
            key = _key(job, position)
            if key != e.key:
                e.key = key
                version = e.snapshot.version + 1 if e.snapshot is not None else 1
                e.publish(Snapshot(version, job, position), crowd_watchers=self.crowd_watchers,
                          crowd_interval_s=self.crowd_interval_s)
        return True

    def _read_rows(self, job_ids: list[str]) -> dict[str, tuple[Job, int | None]]:
        """``{id: (job, queue position)}`` of the rows that exist (runs in a worker thread)."""
        session = get_sessionmaker(self.database_url)()
        try:
            return crud.jobs_with_positions(session=session, job_ids=job_ids)
        finally:
            session.close()

    async def _ticker(self) -> None:
        """Mark for a read the watched jobs not read for ``poll_s`` (no notifications) or ``safety_poll_s``."""
        assert self._wake is not None
        while True:
            interval = self.safety_poll_s if self._live else self.poll_s
            await asyncio.sleep(min(interval, 1.0))
            interval = self.safety_poll_s if self._live else self.poll_s
            now = time.monotonic()
            for e in self._entries.values():
                if not e.dirty and now - e.last_read >= interval * 0.999 and not (e.snapshot and e.snapshot.ended):
                    self._poke(e)

    async def _subscriber(self, subscribed: asyncio.Event) -> None:
        """Hold the subscription; on every (re)subscription re-read every watched job."""
        assert self.broker_url is not None
        failures = 0
        while True:
            try:
                pubsub = await notify.subscribe(self.broker_url)
            except Exception as exc:  # noqa: BLE001 - polling covers until Redis is back
                failures += 1
                subscribed.set()  # the first attempt is over: start() waits no longer
                if failures == 1 or failures % 60 == 0:
                    log.warning("watch hub: cannot subscribe to job notifications; polling meanwhile",
                                extra={"error": str(exc), "attempts": failures})
                await asyncio.sleep(RESUBSCRIBE_S)
                continue
            self._pubsub = pubsub
            self._live = True
            subscribed.set()
            if failures:
                log.info("watch hub: subscribed to job notifications again", extra={"attempts": failures})
            failures = 0
            for e in self._entries.values():  # what changed while not subscribed
                self._poke(e)
            try:
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_TIMEOUT_S)
                    if msg is None or msg.get("type") != "message":
                        continue
                    decoded = notify.decode(msg["data"])
                    if decoded is not None:
                        self.notified(*decoded)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away: poll, then subscribe again
                log.warning("watch hub: job notifications lost; polling until subscribed again",
                            extra={"error": str(exc)})
            finally:
                self._live = False
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await notify.unsubscribe(pubsub)
            failures = 1
            await asyncio.sleep(RESUBSCRIBE_S)


# --- the hub of a loop ----------------------------------------------------------------------------------------

_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], WatchHub]] = (
    weakref.WeakKeyDictionary()
)


def _hub_key(settings: Settings) -> tuple[str, str]:
    return settings.database_url, settings.broker_url


def register_hub(settings: Settings, hub: WatchHub | None) -> None:
    """Make ``hub`` the one :func:`hub_for` gives on this loop for ``settings`` (None: forget it)."""
    hubs = _hubs.setdefault(asyncio.get_running_loop(), {})
    if hub is None:
        hubs.pop(_hub_key(settings), None)
    else:
        hubs[_hub_key(settings)] = hub


def hub_for(settings: Settings) -> WatchHub:
    """The hub of this event loop for ``settings``' database and broker (made on first use)."""
    hubs = _hubs.setdefault(asyncio.get_running_loop(), {})
    key = _hub_key(settings)
    hub = hubs.get(key)
    if hub is None:
        hub = hubs[key] = WatchHub(settings)
    return hub
