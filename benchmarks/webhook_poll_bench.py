"""What the webhook dispatcher's poll costs: the due-deliveries query (run once per ECHO4O_WEBHOOK_POLL_S by every
gateway) on a database holding many finished deliveries and jobs still running, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/webhook_poll_bench.py [--delivered 20000] [--waiting 500] [--runs 200]
        [--postgres postgresql+psycopg2://postgres@127.0.0.1:5432/postgres]

Prints the median and p95 of one poll (the query that finds nothing due, the common case) and of one claim.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa

from echo4o.db import session_scope, upgrade_to_head
from echo4o.db import webhooks as records
from echo4o.db.models import Job, WebhookDelivery, utcnow


def fill(url: str, delivered: int, waiting: int) -> None:
    now = utcnow()
    with session_scope(url) as s:
        jobs, rows = [], []
        for i in range(delivered + waiting):
            job_id = uuid.uuid4().hex
            done = i < delivered
            jobs.append({"id": job_id, "kind": "generate", "owner": "k", "params": {}, "model_version": "m",
                         "priority": 5, "status": "succeeded" if done else "running", "progress_step": 0,
                         "cancel_requested": False, "attempts": 1, "created_at": now, "updated_at": now})
            rows.append({"job_id": job_id, "owner": "k", "url": "https://example.com/h", "base_url": "",
                         "state": "delivered" if done else "waiting", "attempts": 1 if done else 0,
                         "next_attempt_at": now - timedelta(seconds=1), "created_at": now})
        s.execute(sa.insert(Job), jobs)
        s.execute(sa.insert(WebhookDelivery), rows)
        s.commit()


def timed(fn, runs: int) -> tuple[float, float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.95) - 1]


def bench(name: str, url: str, args: argparse.Namespace) -> None:
    upgrade_to_head(url)
    fill(url, args.delivered, args.waiting)
    with session_scope(url) as s:
        poll = timed(lambda: records.due_deliveries(session=s), args.runs)
        # one job ends: its delivery becomes due, is found and claimed
        ids = s.scalars(sa.select(WebhookDelivery.job_id).where(WebhookDelivery.state == "waiting")).all()
        claims = []
        for job_id in ids[: min(len(ids), args.runs)]:
            s.execute(sa.update(Job).where(Job.id == job_id).values(status="succeeded"))
            s.commit()
            t = time.perf_counter()
            (due,) = [d for d in records.due_deliveries(session=s) if d.job_id == job_id]
            assert records.claim(session=s, due=due, lease_s=60) == 1
            claims.append((time.perf_counter() - t) * 1000)
        claims.sort()
    print(f"{name}: {args.delivered} delivered + {args.waiting} waiting rows: poll (nothing due) median "
          f"{poll[0]:.2f} ms, p95 {poll[1]:.2f} ms; find + claim one due row median {statistics.median(claims):.2f} ms "
          f"({len(claims)} claims)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delivered", type=int, default=20000)
    p.add_argument("--waiting", type=int, default=500)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--postgres", default="", help="an admin URL: a scratch database is made there and dropped")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        bench("sqlite", f"sqlite:///{d}/bench.db", args)
    if args.postgres:
        admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        name = f"echo4o_whbench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            bench("postgresql", admin.url.set(database=name).render_as_string(hide_password=False), args)
        finally:
            from echo4o.db import dispose_engines

            dispose_engines()
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
