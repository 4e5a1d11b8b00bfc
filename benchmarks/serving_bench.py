"""Serving overhead and submission throughput of the gateway + Celery + Redis stack.

1. Overhead (``benchmarks/overhead_bench.py``, which this runs): a direct ``Echo4oPipeline`` call in this process
   alternated with the same job through a live stack (``echo4o serve`` on uvicorn, Redis broker, one
   ``echo4o worker`` subprocess: ``POST /generate?wait=`` until the finished job comes back, then the PNG
   downloaded), idle and while 8 other jobs are being submitted and followed (``--loops``). ``overhead_ratio`` =
   median end-to-end / median direct; ``serving_overhead`` = median serving path over the job's own sampling;
   ``overhead_ratio_under_load`` and ``serving_overhead_under_load`` the same under load.
2. Submissions: ``POST /generate`` driven by wrk (a Lua script sends the JSON body and the key) for
   ``--duration`` seconds at concurrency 8 and 64, against a gateway started with no worker (jobs stay
   queued), job records on SQLite, then on a fresh PostgreSQL database; and the same body against a no-op
   FastAPI route (benchmarks/noop_app.py), the framework's ceiling on this machine. ``submits_per_s`` (c=64,
   SQLite + Redis), ``submits_per_s_postgres``, ``p99_ms_c8`` and ``noop_submits_per_s`` count 2xx answers
   only. Without wrk, Python client processes drive the load (a message says so).

The job size is picked so that sampling takes about ``--target-s`` seconds (1 s by default) on this machine:
a calibration run times the direct call at ``--size`` and sets the step count (``--steps`` fixes it).

    .venv/bin/python benchmarks/serving_bench.py                 # tiny model, made in a temp dir
    .venv/bin/python benchmarks/serving_bench.py --model DIR --json figures.json
    .venv/bin/python benchmarks/serving_bench.py --only submissions --json figures.json

Starts a redis-server of its own on a free port (``--broker-url`` to use another, flushed before and after):
on a database index of the shared Redis, another stack's worker could take the benchmark's jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.support.stack: the live stack helper

from benchmarks.harness import PROMPT, private_redis, process_cpu_s  # noqa: E402
from benchmarks.overhead_bench import (  # noqa: E402
    add_overhead_arguments,
    overhead_figures,
    print_overhead_figures,
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- submissions with wrk (gateway without worker) -------------------------------------------------------

WRK = shutil.which("wrk")
SUBMIT_BODY = {"prompt": PROMPT, "height": 32, "width": 32, "num_steps": 2}
DEFAULT_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "socket_errors": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d, "mean_us": %%f, "max_us": %%d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def run_wrk(url: str, key: str | None, concurrency: int, duration_s: float, tmp: Path,
            path: str = "/generate") -> dict[str, float]:
    """``POST path`` with the submit body for ``duration_s`` at ``concurrency`` connections, driven by wrk
    (several client processes when wrk is not installed)."""
    if WRK is None:
        return run_client_processes(url, key, concurrency, duration_s, path)
    script = tmp / f"submit-{concurrency}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script.write_text(WRK_SCRIPT % {"body": json.dumps(json.dumps(SUBMIT_BODY)), "auth": auth})
    threads = max(1, min(2, concurrency))
    out = subprocess.run(
        [WRK, f"-t{threads}", f"-c{concurrency}", f"-d{duration_s:g}s", "--timeout", "30s", "-s", str(script),
         url + path], capture_output=True, text=True, check=True,
    ).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    ok = raw["requests"] - raw["non2xx"]
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "errors": raw["non2xx"] + raw["socket_errors"],
        "submits_per_s": ok / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "client": "wrk",
    }


def _client_process(url: str, key: str | None, threads: int, duration_s: float, path: str, out: Any) -> None:
    import threading

    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s

    def loop() -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = c.post(path, json=SUBMIT_BODY)
                with lock:
                    lat.append(time.perf_counter() - t0)
                    errors += r.status_code >= 300

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((lat, errors))


def run_client_processes(url: str, key: str | None, concurrency: int, duration_s: float,
                         path: str = "/generate") -> dict[str, float]:
    """The wrk measurement with Python client processes (slower clients: the figures are lower bounds)."""
    import multiprocessing as mp

    print("wrk is not installed: driving the load with Python client processes (install wrk for figures "
          "comparable with docs/performance.md)", file=sys.stderr)
    procs = min(4, concurrency)
    q: Any = mp.Queue()
    ps = [mp.Process(target=_client_process, args=(url, key, concurrency // procs + (i < concurrency % procs),
                                                   duration_s, path, q)) for i in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    wall = time.perf_counter() - t0
    lat = [x for r in results for x in r[0]]
    errors = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
            "submits_per_s": (len(lat) - errors) / wall, "p50_ms": percentile(lat, 0.5) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000, "mean_ms": statistics.fmean(lat) * 1000 if lat else 0.0,
            "client": "python"}


def run_wrk_counting_cpu(pid: int, url: str, key: str | None, concurrency: int, duration_s: float,
                         tmp: Path) -> dict[str, float]:
    """:func:`run_wrk`, plus the server process's CPU milliseconds per answered request: a figure that the
    other load on a shared machine changes much less than the throughput."""
    cpu0 = process_cpu_s(pid)
    figures = run_wrk(url, key, concurrency, duration_s, tmp)
    figures["server_cpu_ms_per_request"] = (process_cpu_s(pid) - cpu0) * 1000 / max(1, figures["requests"])
    return figures


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not up after {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def gateway_only(*, data_dir: Path, broker_url: str, database_url: str | None,
                 env: dict[str, str] | None = None) -> Iterator[tuple[str, str, int]]:
    """``echo4o serve`` with no worker (jobs stay queued): yields (url, user key, its pid)."""
    from echo4o.db import crud, dispose_engines, session_scope, upgrade_to_head
    from tests.support.stack import _base_env, free_port

    data_dir.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{data_dir / 'echo4o.db'}"
    upgrade_to_head(database_url)
    with session_scope(database_url) as s:
        key = crud.create_api_key(session=s, name="bench")[1]
    dispose_engines()
    port = free_port()
    settings_env = {
        "ECHO4O_DATA_DIR": str(data_dir), "ECHO4O_DATABASE_URL": database_url, "ECHO4O_BROKER_URL": broker_url,
        "ECHO4O_MODEL": str(data_dir / "no-model"), "ECHO4O_HOST": "127.0.0.1", "ECHO4O_PORT": str(port),
        "ECHO4O_RATE_LIMIT_PER_MINUTE": "100000000", "ECHO4O_MAX_QUEUED_JOBS_PER_KEY": "100000000",
        "ECHO4O_LOG_LEVEL": "WARNING", **(env or {}),
    }
    log = data_dir / "gateway.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "echo4o", "serve"], env=_base_env(settings_env),
                                stdout=fh, stderr=subprocess.STDOUT, cwd=str(data_dir), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/healthz", proc, log)
        yield url, key, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def noop_gateway(data_dir: Path) -> Iterator[tuple[str, int]]:
    """benchmarks/noop_app.py on uvicorn, as ``echo4o serve`` runs the gateway: the framework's ceiling."""
    from tests.support.stack import _base_env, free_port

    port = free_port()
    log = data_dir / "noop.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("noop_app.py")), "--port", str(port)],
                                env=_base_env({}), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/healthz", proc, log)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def queued_messages(broker_url: str) -> int:
    """Messages waiting in the broker's Redis database (every queue, every priority level)."""
    import redis

    from echo4o.celery_app import PRIORITY_LEVELS, QUEUES

    r = redis.Redis.from_url(broker_url)
    names = [q if p == 0 else f"{q}:{p}" for q in QUEUES for p in range(PRIORITY_LEVELS)]
    return sum(r.llen(n) for n in names)


def submission_figures(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """submits_per_s (c=64, SQLite + Redis), p99_ms_c8, submits_per_s_postgres and noop_submits_per_s."""
    import redis

    r = redis.Redis.from_url(args.broker_url)
    figures: dict[str, Any] = {"client": "wrk" if WRK else "python processes", "duration_s": args.duration,
                               "gateway_processes": args.gateway_processes}
    with noop_gateway(tmp / "noop") as (url, pid):
        run_wrk(url, None, 64, 2, tmp)  # warm-up
        figures["noop"] = run_wrk_counting_cpu(pid, url, None, 64, args.duration, tmp)
    figures["noop_submits_per_s"] = figures["noop"]["submits_per_s"]
    backends = [("sqlite", None)]
    if args.postgres_url:
        backends.append(("postgres", args.postgres_url))
    for name, db in backends:
        r.flushdb()
        with contextlib.ExitStack() as stack:
            if db is not None:
                from tests.support.stack import fresh_database

                db = stack.enter_context(fresh_database(db))
            url, key, pid = stack.enter_context(gateway_only(
                data_dir=tmp / f"gw-{name}", broker_url=args.broker_url, database_url=db,
                env={"ECHO4O_GATEWAY_PROCESSES": str(args.gateway_processes)}))
            run_wrk(url, key, 8, 2, tmp)  # warm-up
            levels = {}
            for c in (8, 64):
                levels[c] = run_wrk_counting_cpu(pid, url, key, c, args.duration, tmp)
            accepted = sum(x["requests"] - x["errors"] for x in levels.values())
            queued = queued_messages(args.broker_url)
            figures[name] = {"c8": levels[8], "c64": levels[64], "messages_queued": queued}
            print(f"{name}: {queued} messages queued (warm-up included) for {accepted} accepted in the timed runs",
                  flush=True)
    r.flushdb()
    figures["submits_per_s"] = figures["sqlite"]["c64"]["submits_per_s"]
    figures["p99_ms_c8"] = figures["sqlite"]["c8"]["p99_ms"]
    if "postgres" in figures:
        figures["submits_per_s_postgres"] = figures["postgres"]["c64"]["submits_per_s"]
        figures["p99_ms_c8_postgres"] = figures["postgres"]["c8"]["p99_ms"]
    return figures


def print_submission_figures(figures: dict[str, Any]) -> None:
    print()
    print(f"submissions ({figures['client']}, {figures['duration_s']:g} s per level, no worker, "
          f"{figures['gateway_processes']} gateway process(es))")
    print(f"{'stack':<22}{'conc':>6}{'requests':>10}{'errors':>8}{'submits/s':>11}{'mean ms':>9}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'cpu ms/req':>11}")
    rows = [("no-op route", figures["noop"])]
    for name in ("sqlite", "postgres"):
        if name in figures:
            rows += [(f"{name} + redis", figures[name]["c8"]), (f"{name} + redis", figures[name]["c64"])]
    for label, b in rows:
        print(f"{label:<22}{b['concurrency']:>6}{b['requests']:>10}{b['errors']:>8}{b['submits_per_s']:>11.1f}"
              f"{b['mean_ms']:>9.1f}{b['p50_ms']:>8.1f}{b['p99_ms']:>8.1f}{b['server_cpu_ms_per_request']:>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_overhead_arguments(ap)  # the end-to-end part's options (overhead_bench.py)
    ap.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL,
                    help="PostgreSQL server for submits_per_s_postgres (a fresh database is made and dropped); "
                         "'' to skip")
    ap.add_argument("--only", choices=("all", "e2e", "submissions"), default="all")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load per submission level")
    ap.add_argument("--gateway-processes", type=int, default=1,
                    help="ECHO4O_GATEWAY_PROCESSES of the gateway under submission load")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="echo4o-serving-bench-"))
    figures: dict[str, Any] = {}
    with contextlib.ExitStack() as cleanup:
        if args.broker_url is None:
            args.broker_url = cleanup.enter_context(private_redis())
        if args.only in ("all", "e2e"):
            figures.update(overhead_figures(args, tmp))
            print_overhead_figures(figures)
        if args.only in ("all", "submissions"):
            figures.update(submission_figures(args, tmp))
            print_submission_figures(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
