"""What watching jobs costs the gateway: CPU of the gateway process with 1000 SSE watchers, against none.

A live stack (``echo4o serve`` as a subprocess, Redis broker by default, one ``echo4o worker``, the tiny model)
and ``--watchers`` Server-Sent-Event streams (``GET /jobs/{id}/events``) held by ``--clients`` client processes
(plain asyncio sockets, so the clients stay light). The gateway's CPU is read from ``/proc/<pid>/stat``
(user + system ticks of the gateway process alone, not its children) over ``--window`` seconds in each phase:

1. idle: no job, no watcher;
2. running: a long job runs, nobody watches it;
3. queued + watchers: the same job runs unwatched, and a second job, queued behind it, has ``--watchers``
   watchers (the pure cost of watching: nothing happens to the watched job);
4. running + watchers: the second job runs (the first was cancelled) with its ``--watchers`` watchers, each of
   which gets every step.

``watching_cpu_pct`` = phase 3 - phase 2, ``watched_running_cpu_pct`` = phase 4 - phase 2: what the watchers
cost on top of the progress itself (the worker writing the row, the hub's one read per change), including
the delivery of every step to every watcher (``events_per_s``); ``cpu_us_per_event`` divides that by the events
delivered. The job-row reads of each window (``echo4o_job_row_reads_total``) show that reads follow changes,
not watchers.

    .venv/bin/python benchmarks/watchers_bench.py                          # 1000 watchers, Redis
    .venv/bin/python benchmarks/watchers_bench.py --embedded --json w.json # no Redis: the shared poller

Starts a redis-server of its own on a free port (``--broker-url`` to use another, flushed before and after)
unless ``--embedded``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.support.stack: the live stack helper

from benchmarks.harness import add_stack_env_argument, private_redis, stack_env  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
OPEN_BATCH = 50  # streams a client opens at once


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks the process ``pid`` has used (its own threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))


# --- client processes --------------------------------------------------------------------------------------------

def client_main(url: str, path: str, key: str, n: int, slot: int, counts, stop) -> None:  # noqa: ANN001 - mp types
    """Hold ``n`` SSE streams of ``path``; counts[2*slot] = streams that got their first event, counts[2*slot+1]
    = events received. Ends when ``stop`` is set."""
    asyncio.run(_client(url, path, key, n, slot, counts, stop))


async def _client(url: str, path: str, key: str, n: int, slot: int, counts, stop) -> None:  # noqa: ANN001
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
               f"Accept: text/event-stream\r\n\r\n").encode()
    ready = events = 0
    writers: list[asyncio.StreamWriter] = []

    async def stream() -> None:
        nonlocal ready, events
        reader, writer = await asyncio.open_connection(host, port)
        writers.append(writer)
        writer.write(request)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"GET {path}: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        first = True
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"event:"):
                events += 1
                if first:
                    first, ready = False, ready + 1

    async def report() -> None:
        while not stop.is_set():
            counts[2 * slot], counts[2 * slot + 1] = ready, events
            await asyncio.sleep(0.2)

    tasks: list[asyncio.Task[None]] = []
    reporter = asyncio.create_task(report())
    for start in range(0, n, OPEN_BATCH):
        batch = [asyncio.create_task(stream()) for _ in range(min(OPEN_BATCH, n - start))]
        tasks += batch
        while len(writers) < len(tasks) and not stop.is_set():  # paced: the next batch once these are open
            for t in batch:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await asyncio.sleep(0.01)
    while not stop.is_set():
        await asyncio.sleep(0.2)
    for w in writers:
        w.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    counts[2 * slot], counts[2 * slot + 1] = ready, events
    reporter.cancel()


class Watchers:
    """``n`` SSE streams of one job over ``clients`` processes."""

    def __init__(self, url: str, key: str, job_id: str, n: int, clients: int) -> None:
        ctx = mp.get_context("spawn")
        self.counts = ctx.Array("q", 2 * clients, lock=False)
        self.stop = ctx.Event()
        self.n = n
        per = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
        self.procs = [ctx.Process(target=client_main, args=(url, f"/jobs/{job_id}/events", key, k, i, self.counts,
                                                            self.stop), daemon=True)
                      for i, k in enumerate(per)]
        for p in self.procs:
            p.start()

    def ready(self) -> int:
        return sum(self.counts[0::2])

    def events(self) -> int:
        return sum(self.counts[1::2])

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ready() < self.n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.ready()} of {self.n} streams got their first event")
            if any(not p.is_alive() for p in self.procs):
                raise RuntimeError("a client process died")
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# --- the measurement ---------------------------------------------------------------------------------------------

def row_reads(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("echo4o_job_row_reads_total "):
            return float(line.split()[1])
    return float("nan")


def job_step(c: httpx.Client, job_id: str) -> tuple[str, int]:
    job = c.get(f"/jobs/{job_id}").json()
    return job["status"], job["progress"]["step"] or 0


def window(pid: int, c: httpx.Client, seconds: float, watchers: Watchers | None, job_id: str | None) -> dict:
    """Gateway CPU over ``seconds`` (the reads of /metrics and of the job are outside the ticks)."""
    reads0 = row_reads(c)
    step0 = job_step(c, job_id)[1] if job_id else 0
    ev0 = watchers.events() if watchers else 0
    t0, ticks0 = time.monotonic(), cpu_ticks(pid)
    time.sleep(seconds)
    ticks1, t1 = cpu_ticks(pid), time.monotonic()
    ev1 = watchers.events() if watchers else 0
    status, step1 = job_step(c, job_id) if job_id else ("", 0)
    reads1 = row_reads(c)
    wall = t1 - t0
    return {
        "wall_s": wall,
        "cpu_pct": 100.0 * (ticks1 - ticks0) / CLK_TCK / wall,
        "ticks": ticks1 - ticks0,
        "events_per_s": (ev1 - ev0) / wall,
        "steps_per_s": (step1 - step0) / wall,
        "row_reads_per_s": (reads1 - reads0) / wall,
        "job_status_after": status,
    }


def wait_status(c: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while (s := job_step(c, job_id))[0] not in statuses or s[1] < 1:
        if s[0] in ("succeeded", "failed", "cancelled"):
            raise RuntimeError(f"job {job_id} ended ({s[0]}) before it was seen {' or '.join(statuses)}: "
                               "make the jobs longer (--size)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {s} after {timeout_s} s")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4, help="client processes holding the streams")
    ap.add_argument("--window", type=float, default=10.0, help="seconds per measured phase")
    ap.add_argument("--size", type=int, default=128, help="image side of the long jobs (sets the step rate)")
    ap.add_argument("--broker-url", default=None, help="Redis to use (flushed before and after); default: a "
                    "redis-server of the run's own on a free port")
    ap.add_argument("--embedded", action="store_true", help="no Redis: embedded broker, the hub polls")
    ap.add_argument("--model", type=Path, help="model folder (default: a tiny model made in a temp dir)")
    add_stack_env_argument(ap)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from echo4o.jobs import MAX_STEPS
    from tests.support.stack import live_stack

    tmp = Path(tempfile.mkdtemp(prefix="echo4o-watchers-bench-"))
    model = args.model
    if model is None:
        from worker.engine.tiny import write_tiny_model

        model = write_tiny_model(tmp / "echo4o-tiny", seed=0)
    cleanup = contextlib.ExitStack()
    broker = None if args.embedded else args.broker_url or cleanup.enter_context(private_redis())
    if broker:
        import redis

        redis.Redis.from_url(broker).flushdb()
    long_job = {"prompt": "a lighthouse on a cliff at dawn", "height": args.size, "width": args.size,
                "num_steps": MAX_STEPS}
    phases: dict[str, dict] = {}
    watchers: Watchers | None = None
    try:
        with live_stack(model=model, data_dir=tmp / "data", broker_url=broker,
                        env={"ECHO4O_LOG_LEVEL": "WARNING", "ECHO4O_MAX_QUEUED_JOBS_PER_KEY": "100000",
                             **stack_env(args.stack_env)}) as stack:
            assert stack.gateway is not None
            pid = stack.gateway.pid
            with stack.client(timeout=600) as c:
                r = c.post("/generate", params={"wait": 600}, json={**long_job, "num_steps": 2, "height": 32,
                                                                    "width": 32})
                assert r.status_code == 200, r.text  # warm path
                print(f"gateway pid {pid}, {'embedded broker (hub polls)' if broker is None else 'Redis'}; "
                      f"{args.watchers} watchers over {args.clients} processes; {args.window:g} s windows", flush=True)
                phases["idle"] = window(pid, c, args.window, None, None)
                first = c.post("/generate", json=long_job).json()
                wait_status(c, first["id"], ("running",))
                phases["running"] = window(pid, c, args.window, None, first["id"])
                # two more long jobs queued behind the first keep the worker busy for the whole watched-queued
                # phase (a fast machine may finish one long job within it); the watched job is another size, so
                # cross-request batching never puts it in their batch
                blockers = [first["id"], *(c.post("/generate", json=long_job).json()["id"] for _ in range(2))]
                second = c.post("/generate", json={**long_job, "height": args.size - 16}).json()
                watchers = Watchers(stack.url, stack.user_key, second["id"], args.watchers, args.clients)
                t0 = time.monotonic()
                watchers.wait_ready(600)
                connect_s = time.monotonic() - t0
                print(f"{args.watchers} streams open in {connect_s:.1f} s", flush=True)
                time.sleep(1.0)
                phases["queued_watched"] = window(pid, c, args.window, watchers, first["id"])
                if job_step(c, second["id"])[0] != "queued":
                    raise RuntimeError("the watched job did not stay queued through its phase: make the jobs "
                                       "longer (--size)")
                for blocker in blockers:
                    c.delete(f"/jobs/{blocker}")
                wait_status(c, second["id"], ("running",))
                phases["running_watched"] = window(pid, c, args.window, watchers, second["id"])
                c.delete(f"/jobs/{second['id']}")
    finally:
        if watchers is not None:
            watchers.close()
        if broker:
            import redis

            redis.Redis.from_url(broker).flushdb()
        cleanup.close()

    run, wq, wr = phases["running"], phases["queued_watched"], phases["running_watched"]
    extra = wr["cpu_pct"] - run["cpu_pct"]
    figures = {
        "mode": "embedded" if broker is None else "redis",
        "watchers": args.watchers,
        "window_s": args.window,
        "connect_s": connect_s,
        "phases": phases,
        "watching_cpu_pct": wq["cpu_pct"] - run["cpu_pct"],
        "watched_running_cpu_pct": extra,
        "cpu_us_per_event": extra / 100.0 / wr["events_per_s"] * 1e6 if wr["events_per_s"] else None,
    }
    print()
    print(f"{'phase':<34}{'gateway CPU %':>14}{'events/s':>10}{'steps/s':>9}{'row reads/s':>13}")
    names = {"idle": "idle (no job, no watcher)", "running": "a job runs, unwatched",
             "queued_watched": f"+ {args.watchers} watch a queued job", "running_watched":
             f"{args.watchers} watch the running job"}
    for key, label in names.items():
        p = phases[key]
        print(f"{label:<34}{p['cpu_pct']:>14.1f}{p['events_per_s']:>10.0f}{p['steps_per_s']:>9.2f}"
              f"{p['row_reads_per_s']:>13.2f}")
    print(f"\nwatching a queued job: {figures['watching_cpu_pct']:+.1f} % of a core for {args.watchers} watchers")
    print(f"watching the running job: {extra:+.1f} % of a core over the unwatched run "
          f"({wr['events_per_s']:.0f} events/s delivered"
          + (f", {figures['cpu_us_per_event']:.0f} us of gateway CPU per event)" if figures["cpu_us_per_event"]
             else ")"))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
