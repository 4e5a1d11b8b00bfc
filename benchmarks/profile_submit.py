"""Profile ``POST /generate`` in-process: the app as ``echo4o serve`` wraps it, driven straight through ASGI.

    .venv/bin/python benchmarks/profile_submit.py [-n 20000] [-c 64] [--profile] [--top 40]

No HTTP server and no client: each request is an ASGI call with the submit body and a real key (SQLite records in
a temporary directory, a redis-server of the run's own), ``-c`` at a time on one event loop, so the figures are
the app's own cost per request. Prints the process CPU ms per request (event loop + batch thread), the event-loop
thread's share, and with ``--profile`` the cProfile of the event-loop thread (the batch thread is not profiled:
its share is the difference).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import private_redis  # noqa: E402
from benchmarks.serving_bench import SUBMIT_BODY  # noqa: E402

BODY = json.dumps(SUBMIT_BODY).encode()


def _scope(key: str) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(BODY)).encode()), (b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
    }


async def _one(app, key: str, statuses: list[int]) -> None:  # noqa: ANN001
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(_scope(key), receive, send)


async def _drive(app, key: str, n: int, concurrency: int) -> list[int]:  # noqa: ANN001
    statuses: list[int] = []
    it = iter(range(n))

    async def client() -> None:
        for _ in it:
            await _one(app, key, statuses)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000, help="requests in the measured run")
    ap.add_argument("-c", type=int, default=64, help="requests in flight at once")
    ap.add_argument("--profile", action="store_true", help="cProfile the event-loop thread")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--callers", nargs="*", default=[], help="print the callers of these functions (regex)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, private_redis() as broker:
        data = Path(tmp)
        os.environ.update({
            "ECHO4O_DATA_DIR": str(data), "ECHO4O_DATABASE_URL": f"sqlite:///{data / 'echo4o.db'}",
            "ECHO4O_BROKER_URL": broker, "ECHO4O_MODEL": str(data / "no-model"),
            "ECHO4O_RATE_LIMIT_PER_MINUTE": "100000000", "ECHO4O_MAX_QUEUED_JOBS_PER_KEY": "100000000",
            "ECHO4O_LOG_LEVEL": "WARNING",
        })
        from backend.app import create_app
        from backend.serving import for_serving
        from echo4o.db import crud, session_scope, upgrade_to_head
        from echo4o.logging import setup_logging
        from echo4o.settings import get_settings

        settings = get_settings()
        setup_logging(settings.log_level)
        upgrade_to_head(settings.database_url)
        with session_scope(settings.database_url) as s:
            key = crud.create_api_key(session=s, name="profile")[1]
        inner = create_app(settings)
        app = for_serving(inner, settings)

        async def run() -> None:
            async with inner.router.lifespan_context(inner):
                await _drive(app, key, 500, args.c)  # warm-up
                loop_thread = time.thread_time()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                prof = cProfile.Profile() if args.profile else None
                if prof:
                    prof.enable()
                statuses = await _drive(app, key, args.n, args.c)
                if prof:
                    prof.disable()
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                loop_cpu = time.thread_time() - loop_thread
                bad = len([s for s in statuses if s != 202])
                print(f"{args.n} submits at c={args.c}: {args.n / wall:.0f}/s in-process, "
                      f"{cpu * 1000 / args.n:.3f} CPU ms per request (event loop {loop_cpu * 1000 / args.n:.3f}, "
                      f"other threads {(cpu - loop_cpu) * 1000 / args.n:.3f}); non-202: {bad}; "
                      f"threads: {threading.active_count()}", flush=True)
                if prof:
                    stats = pstats.Stats(prof).sort_stats(args.sort)
                    stats.print_stats(args.top)
                    for name in args.callers:
                        stats.print_callers(name)

        asyncio.run(run())


if __name__ == "__main__":
    main()
