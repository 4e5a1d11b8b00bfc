"""What a watch-hub round costs when the queue moves: the rows and queue positions of N watched queued jobs.

When a job starts, ends or is requeued, every watched queued job's position may have moved, so the gateway's
watch hub (``backend/services/watch_hub.py``) reads them all again. Two ways of reading them, alternated on the
same records (``--jobs`` queued jobs on the gpu queue, a few on the train queue):

* ``per_job``: one SELECT of the rows, then one COUNT per queued job (the hub's read until 2026-12-03, kept
  here as the baseline);
* ``one_statement``: the rows with each position as a subquery of the same SELECT (``crud.jobs_with_positions``).

Prints the median milliseconds of one read of all N, and the ratio. Records on SQLite in a temp dir, or on
``--database-url`` (a PostgreSQL database it may fill; its jobs table is emptied first and after).

    .venv/bin/python benchmarks/queue_positions_bench.py --jobs 8 100
    .venv/bin/python benchmarks/queue_positions_bench.py --database-url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echo4o.db import crud, get_engine, get_sessionmaker, upgrade_to_head  # noqa: E402
from echo4o.db.models import Job  # noqa: E402
from echo4o.jobs import QUEUE_OF_KIND  # noqa: E402


def per_job(session: sa.orm.Session, ids: list[str]) -> dict[str, tuple[Job, int | None]]:
    jobs = session.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
    return {j.id: (j, _count_ahead(session, j)) for j in jobs}


def _count_ahead(session: sa.orm.Session, job: Job) -> int | None:
    """The baseline's position of one job: a COUNT of its own (as ``crud.queue_position`` did before)."""
    if job.status != "queued":
        return None
    same_queue = [k for k, q in QUEUE_OF_KIND.items() if q == QUEUE_OF_KIND.get(job.kind, "gpu")]
    ahead = sa.or_(Job.priority > job.priority, sa.and_(Job.priority == job.priority, Job.created_at < job.created_at))
    return session.scalar(sa.select(sa.func.count()).select_from(Job)
                          .where(Job.status == "queued", Job.kind.in_(same_queue), Job.id != job.id, ahead)) or 0


def one_statement(session: sa.orm.Session, ids: list[str]) -> dict[str, tuple[Job, int | None]]:
    return crud.jobs_with_positions(session=session, job_ids=ids)


def median_ms(url: str, read: Callable, ids: list[str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        session = get_sessionmaker(url)()  # a fresh session per round, as the hub opens one per read
        t0 = time.perf_counter()
        read(session, ids)
        times.append(time.perf_counter() - t0)
        session.close()
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[8, 100], help="watched queued jobs (one run each)")
    ap.add_argument("--rounds", type=int, default=30, help="reads per way and size, alternated in 3 blocks")
    ap.add_argument("--database-url", default=None, help="records (default: SQLite in a temp dir)")
    args = ap.parse_args()

    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='echo4o-positions-')}/records.db"
    upgrade_to_head(url)
    print(f"records: {get_engine(url).dialect.name}")
    print(f"{'queued jobs':>12}{'per_job ms':>12}{'one_statement ms':>18}{'ratio':>8}")
    try:
        for n in args.jobs:
            with get_engine(url).begin() as conn:
                conn.execute(sa.delete(Job))
            session = get_sessionmaker(url)()
            ids = [crud.create_job(session=session, kind="generate", owner="bench", params={"prompt": "p"},
                                   model_version="tiny", priority=i % 3).id for i in range(n)]
            ids += [crud.create_job(session=session, kind="finetune", owner="bench", params={},
                                    model_version="tiny").id for _ in range(3)]
            session.close()
            positions = []
            for read in (per_job, one_statement):
                with get_sessionmaker(url)() as check:
                    positions.append({i: pos for i, (_, pos) in read(check, ids).items()})
            if positions[0] != positions[1]:
                raise SystemExit(f"the two ways disagree on the queue positions: {positions}")
            old, new = [], []
            for _ in range(3):  # alternated blocks: a noisy stretch of the machine hits both ways
                old.append(median_ms(url, per_job, ids, args.rounds // 3))
                new.append(median_ms(url, one_statement, ids, args.rounds // 3))
            o, w = statistics.median(old), statistics.median(new)
            print(f"{n:>12}{o:>12.2f}{w:>18.2f}{o / w:>8.1f}")
    finally:
        with get_engine(url).begin() as conn:
            conn.execute(sa.delete(Job))


if __name__ == "__main__":
    main()
