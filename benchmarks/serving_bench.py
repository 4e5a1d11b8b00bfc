"""Serving overhead and submission throughput of the gateway + Celery + Redis stack.

1. Direct: ``Echo4oPipeline`` called in this process (same model, size, steps and seed as the jobs).
2. End to end: the same job through a live stack (``echo4o serve`` on uvicorn, Redis broker, one
   ``echo4o worker`` subprocess): ``POST /generate?wait=`` until the finished job comes back, then the PNG
   downloaded. Direct and end-to-end runs alternate. ``overhead_ratio`` = median end-to-end / median direct.
3. Submissions: ``POST /generate`` at concurrency 1, 8 and 64 with the worker stopped (so sampling does not
   compete for the CPU with the gateway): requests per second and p50/p99 latency per level.

The job size is picked so that sampling takes about ``--target-s`` seconds (1 s by default) on this machine:
a calibration run times one step at ``--size`` and sets the step count.

    .venv/bin/python benchmarks/serving_bench.py                 # tiny model, made in a temp dir
    .venv/bin/python benchmarks/serving_bench.py --model DIR --json figures.json

Needs Redis (``--broker-url``, default redis://127.0.0.1:6379/13, flushed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.support.stack: the live stack helper

PROMPT = "a lighthouse on a cliff at dawn"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Direct:
    """The pipeline in this process, on the CPU like the worker."""

    def __init__(self, model: Path, size: int, seed: int) -> None:
        from worker.engine import Echo4oPipeline

        self.pipe = Echo4oPipeline.from_pretrained(str(model), device="cpu", dtype="float32")
        self.kwargs = {"height": size, "width": size, "seed": seed, "num_images": 1}
        self.pipe(PROMPT, num_steps=3, **self.kwargs)  # warm-up, as the worker does

    def calibrate(self, target_s: float) -> int:
        """Steps for about ``target_s`` seconds of sampling (per-step time from a 6-step run)."""
        probe = 6
        t0 = time.perf_counter()
        self.pipe(PROMPT, num_steps=probe, **self.kwargs)
        per_step = (time.perf_counter() - t0) / (probe - 1)
        return max(2, min(100, round(target_s / per_step) + 1))

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.pipe(PROMPT, num_steps=steps, **self.kwargs)
        return time.perf_counter() - t0


def end_to_end(client: httpx.Client, size: int, steps: int, seed: int) -> tuple[float, float]:
    """(client wall seconds from submit to PNG in hand, worker-recorded sampling seconds) of one job."""
    body = {"prompt": PROMPT, "height": size, "width": size, "num_steps": steps, "seed": seed}
    t0 = time.perf_counter()
    r = client.post("/generate", params={"wait": 600}, json=body)
    r.raise_for_status()
    job = r.json()
    if job.get("status") != "succeeded":
        raise RuntimeError(f"job did not succeed in time: {job}")
    client.get(job["result"]["images"][0]["url"]).raise_for_status()
    return time.perf_counter() - t0, job["result"]["timings"]["sampling_s"]


async def submit_burst(url: str, key: str, concurrency: int, total: int) -> dict[str, float]:
    """``total`` submissions through ``concurrency`` concurrent clients; throughput and latency."""
    latencies: list[float] = []
    errors = 0
    next_i = 0
    body = {"prompt": PROMPT, "height": 32, "width": 32, "num_steps": 2}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                 limits=limits) as client:
        async def one_client() -> None:
            nonlocal next_i, errors
            while next_i < total:
                next_i += 1
                t0 = time.perf_counter()
                r = await client.post("/generate", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 202:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": total,
        "errors": errors,
        "submits_per_s": total / wall,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: a tiny model made in a temp dir)")
    ap.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    ap.add_argument("--database-url", default=None, help="job records (default: SQLite in a temp dir)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    ap.add_argument("--steps", type=int, default=None, help="fix num_steps instead of calibrating")
    ap.add_argument("--target-s", type=float, default=1.0, help="sampling seconds per job to calibrate to")
    ap.add_argument("--repeats", type=int, default=9, help="timed jobs per path")
    ap.add_argument("--submits", type=int, default=400, help="submissions per concurrency level")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    import redis

    from tests.support.stack import live_stack

    tmp = Path(tempfile.mkdtemp(prefix="echo4o-serving-bench-"))
    model = args.model
    if model is None:
        from worker.engine.tiny import write_tiny_model

        model = write_tiny_model(tmp / "echo4o-tiny", seed=0)
    seed = 1234

    r = redis.Redis.from_url(args.broker_url)
    r.flushdb()
    direct_wall, e2e_wall, e2e_sampling = [], [], []
    try:
        with live_stack(model=model, data_dir=tmp / "data", broker_url=args.broker_url,
                        database_url=args.database_url, env={"ECHO4O_LOG_LEVEL": "WARNING"}) as stack:
            direct = Direct(model, args.size, seed)
            steps = args.steps or direct.calibrate(args.target_s)
            print(f"job: {args.size}x{args.size}, num_steps={steps}, model {model}", flush=True)
            with stack.client(timeout=600) as client:
                end_to_end(client, args.size, steps, seed)  # warm path
                # interleaved, so that load from elsewhere on the machine hits both paths alike
                for _ in range(args.repeats):
                    direct_wall.append(direct.run(steps))
                    wall, sampling = end_to_end(client, args.size, steps, seed)
                    e2e_wall.append(wall)
                    e2e_sampling.append(sampling)
            for w in stack.workers:  # submissions only from here: keep the CPU for the gateway
                w.stop()
            levels = [int(x) for x in args.concurrency.split(",")]
            bursts = [asyncio.run(submit_burst(stack.url, stack.user_key, n, args.submits)) for n in levels]
    finally:
        r.flushdb()

    direct_med = statistics.median(direct_wall)
    e2e_med = statistics.median(e2e_wall)
    figures = {
        "job": {"height": args.size, "width": args.size, "num_steps": steps, "model": str(model)},
        "direct_s_median": direct_med,
        "end_to_end_s_median": e2e_med,
        "end_to_end_sampling_s_median": statistics.median(e2e_sampling),
        "overhead_s_median": e2e_med - direct_med,
        "overhead_ratio": e2e_med / direct_med,
        # the fastest of each path: less sensitive to other load on a shared machine
        "overhead_ratio_min": min(e2e_wall) / min(direct_wall),
        "direct_s": direct_wall,
        "end_to_end_s": e2e_wall,
        "submissions": bursts,
        "submits_per_s": next((b["submits_per_s"] for b in bursts if b["concurrency"] == 64),
                              bursts[-1]["submits_per_s"]),
    }
    print()
    print(f"{'path':<34}{'median s':>10}{'min s':>10}{'max s':>10}")
    print(f"{'direct pipeline call':<34}{direct_med:>10.3f}{min(direct_wall):>10.3f}{max(direct_wall):>10.3f}")
    print(f"{'gateway + Celery + Redis (e2e)':<34}{e2e_med:>10.3f}{min(e2e_wall):>10.3f}{max(e2e_wall):>10.3f}")
    print(f"{'  of which worker sampling':<34}{statistics.median(e2e_sampling):>10.3f}")
    print(f"overhead_ratio (e2e / direct, medians): {figures['overhead_ratio']:.3f}  "
          f"(+{figures['overhead_s_median'] * 1000:.0f} ms); fastest / fastest: {figures['overhead_ratio_min']:.3f}")
    print()
    print(f"{'concurrency':>12}{'requests':>10}{'errors':>8}{'submits/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for b in bursts:
        print(f"{b['concurrency']:>12}{b['requests']:>10}{b['errors']:>8}{b['submits_per_s']:>12.1f}"
              f"{b['p50_ms']:>10.1f}{b['p99_ms']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
