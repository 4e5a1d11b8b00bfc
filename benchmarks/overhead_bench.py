"""Serving overhead of a ~1 s job, alone and while 8 other jobs are being submitted and followed.

The same job two ways, alternated: the bare pipeline call in this process (``Echo4oPipeline``, CPU, the same
model, size, steps and seed), and end to end through a live stack (``echo4o serve``, Redis broker, one
``echo4o worker``): ``POST /generate?wait=`` until the finished job comes back, then its PNG downloaded.
``overhead_ratio`` = median end-to-end / median direct. The job's own timings split the difference in two:
``serving_path_s`` (median of end-to-end minus the worker's sampling time: the submit, the queue, the worker's
bookkeeping and PNG encoding, the answer and the download; ``phases_s_median`` splits it, see
``benchmarks.harness.PHASES``) and ``sampling_over_direct`` (the worker's sampling
over the direct call: the same computation in another process, which on a small CPU machine also shares its
cores with the gateway and Redis). ``serving_overhead`` (median over the jobs of their serving path over their
sampling) is the overhead against the pipeline call as it ran, in the same moment and under the same load:
under load the direct call and the timed job do not see the same machine (the worker runs background jobs
during a direct call, while during the timed job they wait), so there it is the figure to read. Measured twice:

* ``idle``: nothing else runs;
* ``load``: a client process keeps 8 other jobs going, as 8 clients would: each of 8 loops submits a small job
  (priority 0, below the timed job's 9, so the timed job never queues behind a waiting one), follows its event
  stream, cancels it if it is still queued or running ``--cycle-s`` seconds after its submit (default: the job's
  own length, ``--target-s``), follows the stream to its end, and submits its next job once ``--cycle-s`` has
  passed since the last. The gateway serves those submits, streams and cancels while the timed job passes
  through it; the worker runs the background jobs it finds queued while it is idle (each a few milliseconds of
  sampling), so a timed job that arrives while one runs waits for it, as it would behind any other client's.
  ``--cycle-s 0`` runs the loops flat out instead (a saturation test: each cancels its job as soon as it is
  queued and submits the next at once; on a 2-core machine the load client and the gateway then fill both
  cores). ``--loops 0`` skips it. The gateway process's CPU over the loaded round is reported beside it
  (``gateway_cpu_pct`` of a core, ``gateway_cpu_ms_per_cycle`` per background job): the cost of the load itself,
  which the machine's other work changes much less than the timings.

The step count is calibrated so that the direct call takes about ``--target-s`` seconds.

    .venv/bin/python benchmarks/overhead_bench.py --json overhead.json

Starts a redis-server of its own on a free port (``--broker-url`` to use another, flushed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.support.stack: the live stack helper

from benchmarks.harness import PHASES, Direct, add_stack_env_argument, end_to_end, process_cpu_s  # noqa: E402

BACKGROUND_JOB = {"prompt": "a small red cube", "height": 32, "width": 32, "num_steps": 2, "priority": 0}


# --- background load (a process of its own) ----------------------------------------------------------------------

def load_main(url: str, key: str, loops: int, cycle_s: float, counts, stop) -> None:  # noqa: ANN001 - mp types
    """``loops`` submit-follow loops until ``stop``; counts[0] = cycles done, counts[1] = errors."""
    asyncio.run(_load(url, key, loops, cycle_s, counts, stop))


async def _read_events(lines: AsyncIterator[str], until: set[str]) -> str:
    """Read the stream's lines up to an event named in ``until``; its name ("" when the stream ended)."""
    name = ""
    async for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
            if name in until:
                return name
    return name


ENDS = {"done", "failed", "cancelled"}


async def _load(url: str, key: str, loops: int, cycle_s: float, counts, stop) -> None:  # noqa: ANN001
    limits = httpx.Limits(max_connections=4 * loops, max_keepalive_connections=4 * loops)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                 limits=limits) as c:
        async def cycle() -> None:
            """One job: submit, follow, cancel it at ``cycle_s`` if it has not ended, follow it to its end."""
            started = time.monotonic()
            r = await c.post("/generate", json=BACKGROUND_JOB)
            r.raise_for_status()
            job = r.json()
            async with c.stream("GET", job["events_url"]) as s:
                lines = s.aiter_lines()
                if await _read_events(lines, {"queued", "progress", *ENDS}) in ENDS:
                    return
                # the rest of the stream is read by a task of its own: a cancelled read would close the stream
                reader = asyncio.create_task(_read_events(lines, ENDS))
                hold = cycle_s - (time.monotonic() - started)
                done, _ = await asyncio.wait({reader}, timeout=hold if hold > 0 else 0)
                if not done:
                    await c.delete(f"/jobs/{job['id']}")
                await reader
            await asyncio.sleep(max(0.0, cycle_s - (time.monotonic() - started)))

        async def loop() -> None:
            while not stop.is_set():
                try:
                    await cycle()
                    counts[0] += 1
                except httpx.HTTPError:
                    counts[1] += 1
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(loop() for _ in range(loops)))


class Load:
    def __init__(self, url: str, key: str, loops: int, cycle_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.counts = ctx.Array("q", 2, lock=True)
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=load_main, args=(url, key, loops, cycle_s, self.counts, self.stop),
                                daemon=True)
        self.proc.start()

    def close(self) -> None:
        self.stop.set()
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


# --- the two paths ----------------------------------------------------------------------------------------------

def measure(direct: Direct, client: httpx.Client, size: int, steps: int, seed: int, repeats: int) -> dict:
    """Alternated runs (load from elsewhere on the machine hits both paths alike)."""
    d, trips = [], []
    for _ in range(repeats):
        d.append(direct.run(steps))
        trips.append(end_to_end(client, size, steps, seed, priority=9))
    e, sampling = [t.wall_s for t in trips], [t.sampling_s for t in trips]
    dm, em, sm = statistics.median(d), statistics.median(e), statistics.median(sampling)
    return {"direct_s": d, "end_to_end_s": e, "worker_sampling_s": sampling, "direct_s_median": dm,
            "end_to_end_s_median": em, "worker_sampling_s_median": sm, "overhead_s_median": em - dm,
            "overhead_ratio": em / dm, "overhead_ratio_min": min(e) / min(d),
            "serving_path_s_median": statistics.median(t.wall_s - t.sampling_s for t in trips),
            "phases_s_median": {p: statistics.median(t.phases[p] for t in trips) for p in PHASES},
            "phases_s_max": {p: max(t.phases[p] for t in trips) for p in PHASES},
            "serving_path_s_max": max(t.wall_s - t.sampling_s for t in trips),
            "sampling_over_direct": sm / dm,
            "serving_overhead": statistics.median((t.wall_s - t.sampling_s) / t.sampling_s for t in trips)}


def measure_loaded(direct: Direct, client: httpx.Client, stack: Any, args: argparse.Namespace, steps: int,
                   seed: int) -> dict:
    """:func:`measure` while ``args.loops`` background loops submit and follow jobs (module docstring)."""
    cycle_s = args.target_s if args.cycle_s is None else args.cycle_s
    load = Load(stack.url, stack.user_key, args.loops, cycle_s)
    try:
        deadline = time.monotonic() + 120
        while load.counts[0] < args.loops and time.monotonic() < deadline:  # the loops are going
            time.sleep(0.2)
        cycles0, cpu0 = load.counts[0], process_cpu_s(stack.gateway.pid)
        t0 = time.monotonic()
        loaded = measure(direct, client, args.size, steps, seed, args.repeats)
        cycles, wall = load.counts[0] - cycles0, time.monotonic() - t0
        gateway_cpu_s = process_cpu_s(stack.gateway.pid) - cpu0
        loaded["background_cycles_per_s"] = cycles / wall
        # what the gateway spends per background job (its submit, stream, cancel and the hub's reads): the
        # figure that the machine's other load changes least
        loaded["gateway_cpu_pct"] = 100 * gateway_cpu_s / wall
        loaded["gateway_cpu_ms_per_cycle"] = 1000 * gateway_cpu_s / max(1, cycles)
        loaded["background_errors"] = load.counts[1]
    finally:
        load.close()
    cancelled = client.get("/jobs", params={"status": "cancelled", "limit": 1}).json()["count"]
    started = 0
    for offset in range(0, cancelled, 200):
        page = client.get("/jobs", params={"status": "cancelled", "limit": 200, "offset": offset})
        started += sum(1 for j in page.json()["data"] if j["started_at"])
    timed = 1 + 2 * args.repeats  # the warm-up job, then the idle and the loaded rounds'
    succeeded = client.get("/jobs", params={"status": "succeeded", "limit": 1}).json()["count"] - timed
    loaded.update(background_jobs=cancelled + succeeded, background_cancelled=cancelled,
                  background_started_then_cancelled=started, background_ran=succeeded, cycle_s=cycle_s,
                  loops=args.loops)
    return loaded


def add_overhead_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the overhead measurement (shared with ``serving_bench.py``)."""
    ap.add_argument("--model", type=Path, help="model folder (default: a tiny model made in a temp dir)")
    ap.add_argument("--broker-url", default=None, help="Redis to use (flushed before and after); default: a "
                    "redis-server of the run's own on a free port")
    ap.add_argument("--database-url", default=None, help="job records of the stack (default: SQLite)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    ap.add_argument("--steps", type=int, default=None, help="fix num_steps instead of calibrating")
    ap.add_argument("--target-s", type=float, default=1.0, help="seconds of the direct call to calibrate to")
    ap.add_argument("--repeats", type=int, default=9, help="timed jobs per path and condition")
    ap.add_argument("--loops", type=int, default=8, help="background submit-and-follow loops under load (0: no "
                    "load phase)")
    ap.add_argument("--cycle-s", type=float, default=None, help="under load, each loop's job is followed and "
                    "a new one submitted once per this many seconds (default: --target-s); 0: flat out, each job "
                    "cancelled as soon as it is queued")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the direct call and the "
                    "worker (default: torch's). On a small CPU machine 1 leaves a core to the gateway, Redis and the "
                    "client, as a GPU machine leaves its CPU to them")
    add_stack_env_argument(ap)


def overhead_figures(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Idle and loaded rounds on a live stack (``args.broker_url``: a Redis it may flush); the figures."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import redis

    from benchmarks.harness import stack_env, torch_threads
    from tests.support.stack import live_stack

    model = args.model
    if model is None:
        from worker.engine.tiny import write_tiny_model

        model = write_tiny_model(tmp / "echo4o-tiny", seed=0)
    seed = 1234
    r = redis.Redis.from_url(args.broker_url)
    r.flushdb()
    try:
        # the worker gets the torch threads the direct call has (the tests' stacks pin one per process)
        with live_stack(model=model, data_dir=tmp / "data", broker_url=args.broker_url,
                        database_url=args.database_url,
                        env={"ECHO4O_LOG_LEVEL": "WARNING", "ECHO4O_MAX_QUEUED_JOBS_PER_KEY": "100000",
                             "OMP_NUM_THREADS": str(torch_threads()), **stack_env(args.stack_env)}) as stack:
            direct = Direct(model, args.size, seed)
            steps = args.steps or direct.calibrate(args.target_s)
            print(f"job: {args.size}x{args.size}, num_steps={steps}, model {model}; direct call "
                  f"{direct.run(steps):.2f} s", flush=True)
            with stack.client(timeout=600) as client:
                end_to_end(client, args.size, steps, seed, priority=9)  # warm path
                idle = measure(direct, client, args.size, steps, seed, args.repeats)
                print(f"idle: overhead_ratio {idle['overhead_ratio']:.3f}", flush=True)
                loaded = measure_loaded(direct, client, stack, args, steps, seed) if args.loops else None
    finally:
        r.flushdb()

    figures = {"job": {"height": args.size, "width": args.size, "num_steps": steps, "model": str(model),
                       "threads": torch_threads()},
               "idle": idle, "overhead_ratio": idle["overhead_ratio"],
               "serving_path_s": idle["serving_path_s_median"], "sampling_over_direct": idle["sampling_over_direct"],
               "serving_overhead": idle["serving_overhead"]}
    if loaded is not None:
        figures.update(load=loaded, overhead_ratio_under_load=loaded["overhead_ratio"],
                       serving_overhead_under_load=loaded["serving_overhead"])
    return figures


def print_overhead_figures(figures: dict[str, Any]) -> None:
    conditions = [("idle", figures["idle"])]
    loaded = figures.get("load")
    if loaded is not None:
        conditions.append((f"{loaded['loops']} jobs followed", loaded))
    print()
    print(f"{'condition':<24}{'direct s':>10}{'e2e s':>9}{'sampling s':>12}{'ratio':>7}{'ratio (min)':>13}"
          f"{'serving path ms':>17}{'serving/sampling':>18}{'sampling/direct':>17}")
    for name, f in conditions:
        print(f"{name:<24}{f['direct_s_median']:>10.3f}{f['end_to_end_s_median']:>9.3f}"
              f"{f['worker_sampling_s_median']:>12.3f}{f['overhead_ratio']:>7.3f}{f['overhead_ratio_min']:>13.3f}"
              f"{f['serving_path_s_median'] * 1000:>17.0f}{f['serving_overhead'] * 100:>17.1f}%"
              f"{f['sampling_over_direct']:>17.3f}")
    for name, f in conditions:
        print(f"serving path, {name}, median ms: "
              + ", ".join(f"{phase} {f['phases_s_median'][phase] * 1000:.1f}" for phase in PHASES))
        print(f"serving path, {name}, slowest job {f['serving_path_s_max'] * 1000:.0f} ms; slowest phases, ms: "
              + ", ".join(f"{phase} {f['phases_s_max'][phase] * 1000:.1f}" for phase in PHASES))
    if loaded is not None:
        print(f"background: {loaded['loops']} loops, a job per {loaded['cycle_s']:g} s each; "
              f"{loaded['background_cycles_per_s']:.1f} cycles/s, {loaded['background_jobs']} jobs: "
              f"{loaded['background_ran']} ran, {loaded['background_cancelled']} cancelled "
              f"({loaded['background_started_then_cancelled']} of them after they started); "
              f"{loaded['background_errors']} errors; gateway CPU {loaded['gateway_cpu_pct']:.0f} % of a core, "
              f"{loaded['gateway_cpu_ms_per_cycle']:.1f} ms per cycle")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_overhead_arguments(ap)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from benchmarks.harness import private_redis

    tmp = Path(tempfile.mkdtemp(prefix="echo4o-overhead-bench-"))
    with contextlib.ExitStack() as cleanup:
        if args.broker_url is None:
            args.broker_url = cleanup.enter_context(private_redis())
        figures = overhead_figures(args, tmp)
    print_overhead_figures(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
