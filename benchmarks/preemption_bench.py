"""How long a user's job waits behind a benchmark run's images, with priority preemption on and off.

Two live stacks side by side (``echo4o serve`` + one ``echo4o worker`` each, the tiny model on the CPU, their own
records and Redis database), one with ``ECHO4O_PREEMPTION=true`` and one with ``false``; each round runs the same
scenario on both, in alternating order:

1. ``--background`` jobs of a benchmark run's priority (``echo4o.jobs.BENCHMARK_IMAGE_PRIORITY``, 1) and of one
   shape (``--size``, ``--steps``) are submitted; the worker samples them in batches (``ECHO4O_BATCH_MAX_SIZE``).
2. Once the first of them has sampled a step, a user's job of the same shape at the default priority (5) is
   submitted with ``?wait`` (it cannot join the batch already sampling).
3. The round ends when every job has ended.

Per mode: the user's job end to end (submit to its answer), its queue wait (``timings.queue_wait_s``) and
sampling time, how many background jobs ended before it started and how many it paused, and the background's
makespan (first submit to the last job's end: what preemption costs the run, which only reorders
work). Medians over ``--repeats`` rounds.

    .venv/bin/python benchmarks/preemption_bench.py --json preemption.json

Starts a redis-server of its own on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.support.stack: the live stack helper

from benchmarks.harness import PROMPT, private_redis, torch_threads  # noqa: E402

MODES = ("on", "off")
POLL_S = 0.05  # the gateway shares the 2 cores with the worker: polling must not load it


def _body(size: int, steps: int, seed: int, priority: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "height": size, "width": size, "num_steps": steps, "seed": seed, "priority": priority}


def _wait(client: httpx.Client, job_id: str, until) -> dict[str, Any]:  # noqa: ANN001 - a predicate on the Job
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        if until(job):
            return job
        time.sleep(POLL_S)


def _ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def _at(job: dict[str, Any], key: str) -> float:
    return datetime.fromisoformat(job[key]).timestamp()


def _paused_by(job: dict[str, Any]) -> list[str]:
    """The jobs that paused ``job`` (its result's ``details.paused``)."""
    details = (job.get("result") or {}).get("details") or {}
    return [pause["job_id"] for pause in details.get("paused", [])]


def scenario(client: httpx.Client, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """One round on one stack: the figures of the user's job and of the background."""
    from echo4o.jobs import BENCHMARK_IMAGE_PRIORITY, DEFAULT_PRIORITY

    t0 = time.time()
    background = [client.post("/generate", json=_body(args.size, args.steps, seed + n, BENCHMARK_IMAGE_PRIORITY))
                  .raise_for_status().json()["id"] for n in range(args.background)]
    _wait(client, background[0], lambda j: _ended(j) or (j["progress"] or {}).get("step", 0) >= 1)
    sent = time.perf_counter()
    r = client.post("/generate", params={"wait": 600}, json=_body(args.size, args.steps, seed, DEFAULT_PRIORITY))
    answered = time.perf_counter() - sent
    user = r.raise_for_status().json()
    if user["status"] != "succeeded":
        raise RuntimeError(f"the user's job did not succeed: {user}")
    done = [_wait(client, job_id, _ended) for job_id in background]
    ends = [_at(job, "finished_at") for job in done]
    started = _at(user, "started_at")
    return {"user_e2e_s": answered, "user_queue_s": user["result"]["timings"]["queue_wait_s"],
            "user_sampling_s": user["result"]["timings"]["sampling_s"],
            "ended_before_user": float(sum(end <= started for end in ends)),
            "paused_by_user": float(sum(user["id"] in _paused_by(job) for job in done)),
            "background_makespan_s": max(ends) - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="height and width of every job (default 256)")
    ap.add_argument("--steps", type=int, default=50, help="num_steps of every job (default 50)")
    ap.add_argument("--background", type=int, default=8, help="background jobs per round (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per mode (default 3)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from tests.support.stack import live_stack
    from worker.engine.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="echo4o-preemption-bench-"))
    model = write_tiny_model(tmp / "echo4o-tiny", seed=0)
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as stacks:
        redis_server = stacks.enter_context(private_redis()).rsplit("/", 1)[0]  # without its database index
        clients = {}
        for db, mode in enumerate(MODES, start=1):
            stack = stacks.enter_context(live_stack(
                model=model, data_dir=tmp / mode, broker_url=f"{redis_server}/{db}",
                env={"ECHO4O_LOG_LEVEL": "WARNING", "ECHO4O_PREEMPTION": "true" if mode == "on" else "false",
                     "OMP_NUM_THREADS": str(torch_threads())}))
            clients[mode] = stacks.enter_context(stack.client(timeout=600))
        print(f"jobs: {args.size}x{args.size}, num_steps={args.steps}; {args.background} background jobs per round",
              flush=True)
        for mode in MODES:  # warm both paths once
            scenario(clients[mode], argparse.Namespace(**{**vars(args), "background": 1}), seed=1)
        for r in range(args.repeats):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                figures = scenario(clients[mode], args, seed=100 * (r + 1))
                rounds[mode].append(figures)
                print(f"round {r + 1}, preemption {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()),
                      flush=True)

    summary = {mode: {k: statistics.median(f[k] for f in rounds[mode]) for k in rounds[mode][0]} for mode in MODES}
    print()
    print(f"{'preemption':<12}{'user e2e s':>12}{'user queue s':>14}{'user sampling s':>17}{'ended before':>14}"
          f"{'paused by it':>14}{'background makespan s':>23}")
    for mode in MODES:
        s = summary[mode]
        print(f"{mode:<12}{s['user_e2e_s']:>12.3f}{s['user_queue_s']:>14.3f}{s['user_sampling_s']:>17.3f}"
              f"{s['ended_before_user']:>14.1f}{s['paused_by_user']:>14.1f}{s['background_makespan_s']:>23.3f}")
    on, off = summary["on"], summary["off"]
    print(f"user job end to end: {off['user_e2e_s'] / on['user_e2e_s']:.1f}x faster with preemption; background "
          f"makespan {on['background_makespan_s'] / off['background_makespan_s']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rounds": rounds,
                                         "median": summary}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
