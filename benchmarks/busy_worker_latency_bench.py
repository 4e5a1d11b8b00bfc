"""The gateway's answer times while the worker samples, at each ``ECHO4O_WORKER_NICE`` given.

On a CPU machine the worker's torch threads fill the cores while a job samples, and the gateway's requests wait
for a time slice. ``ECHO4O_WORKER_NICE`` lowers the worker's CPU priority so that the gateway runs at once. For
each nice value (``--nice``, alternated over ``--rounds`` rounds, a fresh live stack each: ``echo4o serve``,
Redis broker, one ``echo4o worker``, the tiny model, the worker with the torch threads of this process), the
script:

1. runs one small job to have a finished job and its PNG;
2. submits a long job (``--size``, ``--steps``) and waits until it samples;
3. while it samples, sends ``--requests`` pairs, one after the other: ``GET /jobs/{id}`` of the finished job (a
   row read) and the download of its PNG, timing each;
4. cancels the long job.

Prints the median and 99th percentile of each request per nice value, and the long job's steps per second (what
the lower priority costs the sampling, while the gateway is busy answering).

    .venv/bin/python benchmarks/busy_worker_latency_bench.py --nice 0 10 --json busy.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import private_redis, torch_threads  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_round(model: Path, nice: int, args: argparse.Namespace, tmp: Path, broker_url: str) -> dict[str, Any]:
    import redis

    from tests.support.stack import live_stack

    redis.Redis.from_url(broker_url).flushdb()
    env = {"ECHO4O_LOG_LEVEL": "WARNING", "ECHO4O_WORKER_NICE": str(nice), "OMP_NUM_THREADS": str(torch_threads())}
    with live_stack(model=model, data_dir=tmp / f"data-{nice}-{time.monotonic_ns()}", broker_url=broker_url,
                    env=env) as stack, stack.client(timeout=600) as client:
        small = client.post("/generate", params={"wait": 600},
                            json={"prompt": "a small red cube", "height": 64, "width": 64, "num_steps": 2}).json()
        if small.get("status") != "succeeded":
            raise RuntimeError(f"the small job did not succeed: {small}")
        png_url = small["result"]["images"][0]["url"]
        r = client.post("/generate", json={"prompt": "a long job", "height": args.size, "width": args.size,
                                           "num_steps": args.steps})
        if r.status_code != 202:
            raise RuntimeError(f"the long job was refused: {r.status_code} {r.text}")
        long_id = r.json()["id"]
        deadline = time.monotonic() + 600
        while (job := client.get(f"/jobs/{long_id}").json())["status"] != "running" \
                or not job["progress"]["step"]:
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                raise RuntimeError(f"the long job never started sampling: {job}")
            time.sleep(0.05)
        step0, t0 = job["progress"]["step"], time.perf_counter()
        row_ms, png_ms = [], []
        for _ in range(args.requests):
            t = time.perf_counter()
            client.get(f"/jobs/{small['id']}").raise_for_status()
            row_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            client.get(png_url).raise_for_status()
            png_ms.append((time.perf_counter() - t) * 1000)
        job = client.get(f"/jobs/{long_id}").json()
        elapsed = time.perf_counter() - t0
        if job["status"] != "running":
            raise RuntimeError(f"the long job ended before the requests did (raise --steps): {job['status']}")
        steps_per_s = (job["progress"]["step"] - step0) / elapsed
        client.post(f"/jobs/{long_id}/cancel")
    return {"nice": nice, "row_ms": row_ms, "png_ms": png_ms, "steps_per_s": steps_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nice", type=int, nargs="+", default=[0, 10], help="ECHO4O_WORKER_NICE values to compare")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every value, alternated")
    ap.add_argument("--requests", type=int, default=100, help="request pairs per round")
    ap.add_argument("--size", type=int, default=1024, help="image side of the long job")
    ap.add_argument("--steps", type=int, default=100, help="steps of the long job (it must outlast the requests)")
    ap.add_argument("--model", type=Path, help="model folder (default: a tiny model made in a temp dir)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="echo4o-busy-bench-"))
    model = args.model
    if model is None:
        from worker.engine.tiny import write_tiny_model

        model = write_tiny_model(tmp / "echo4o-tiny", seed=0)
    rounds = []
    with contextlib.ExitStack() as cleanup:
        broker_url = cleanup.enter_context(private_redis())
        for i in range(args.rounds):
            for nice in args.nice:
                r = one_round(model, nice, args, tmp, broker_url)
                print(f"round {i + 1}, nice {nice}: GET /jobs/{{id}} p50 {statistics.median(r['row_ms']):.1f} ms, "
                      f"PNG p50 {statistics.median(r['png_ms']):.1f} ms, sampling {r['steps_per_s']:.1f} steps/s",
                      flush=True)
                rounds.append(r)

    figures: dict[str, Any] = {"threads": torch_threads(), "size": args.size, "requests": args.requests, "by_nice": {}}
    print(f"\n{'nice':>5}{'job row p50':>13}{'p99':>8}{'PNG p50':>10}{'p99':>8}{'sampling steps/s':>18}")
    for nice in args.nice:
        mine = [r for r in rounds if r["nice"] == nice]
        row = [v for r in mine for v in r["row_ms"]]
        png = [v for r in mine for v in r["png_ms"]]
        f = {"row_ms_p50": statistics.median(row), "row_ms_p99": percentile(row, 0.99),
             "png_ms_p50": statistics.median(png), "png_ms_p99": percentile(png, 0.99),
             "steps_per_s": statistics.median(r["steps_per_s"] for r in mine)}
        figures["by_nice"][str(nice)] = f
        print(f"{nice:>5}{f['row_ms_p50']:>13.1f}{f['row_ms_p99']:>8.1f}{f['png_ms_p50']:>10.1f}{f['png_ms_p99']:>8.1f}"
              f"{f['steps_per_s']:>18.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
