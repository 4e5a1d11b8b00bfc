"""What the serving benchmarks share: a private Redis, the stack's settings, the direct pipeline call they compare
against, and one job timed end to end through a live stack."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import httpx

PROMPT = "a lighthouse on a cliff at dawn"


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of this run's own on a free port, no persistence (tests/support/redis_server.py); its URL."""
    from tests.support.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="echo4o-bench-redis-")), appendonly=False).start()
    try:
        yield server.url
    finally:
        server.stop()


def add_stack_env_argument(ap: argparse.ArgumentParser) -> None:
    """``--stack-env NAME=VALUE`` (repeatable): settings for the stack's processes, for A/B runs of a setting."""
    ap.add_argument("--stack-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the stack's processes (repeatable), e.g. ECHO4O_PROGRESS_INTERVAL_S=0.05")


def stack_env(pairs: list[str]) -> dict[str, str]:
    """``--stack-env NAME=VALUE`` arguments as an environment; exits naming a malformed one."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--stack-env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def torch_threads() -> int:
    """The CPU threads torch uses in this process (the direct call's): the stack's worker gets as many."""
    import torch

    return torch.get_num_threads()


class Direct:
    """The pipeline in this process, on the CPU like the worker, warmed up as the worker is."""

    def __init__(self, model: Path, size: int, seed: int) -> None:
        from worker.engine import Echo4oPipeline

        self.pipe = Echo4oPipeline.from_pretrained(str(model), device="cpu", dtype="float32")
        self.kwargs = {"height": size, "width": size, "seed": seed, "num_images": 1}
        self.pipe(PROMPT, num_steps=3, **self.kwargs)

    def calibrate(self, target_s: float) -> int:
        """Steps for a call of about ``target_s`` seconds (per-step time from two call lengths)."""
        times = {}
        for n in (3, 9):
            t0 = time.perf_counter()
            self.pipe(PROMPT, num_steps=n, **self.kwargs)
            times[n] = time.perf_counter() - t0
        per_step = max(1e-3, (times[9] - times[3]) / 6)
        fixed = max(0.0, times[3] - 2 * per_step)
        return max(2, min(100, round((target_s - fixed) / per_step) + 1))

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.pipe(PROMPT, num_steps=steps, **self.kwargs)
        return time.perf_counter() - t0


class Trip(NamedTuple):
    """One job end to end: the client's wall seconds from submit to PNG in hand, the worker's recorded sampling
    seconds, and ``phases``: where the rest went, in seconds, from the job's timestamps and timings against the
    client's clock (one machine, one clock)."""

    wall_s: float
    sampling_s: float
    phases: dict[str, float]


#: The serving path of a job, in order (``Trip.phases``): submit accepted (client send to the row's
#: ``created_at``), queue (to the claim, ``started_at``), the worker's own bookkeeping before and after sampling,
#: PNG encoding and writing, the answer (the worker's result to the client holding it) and the PNG download.
PHASES = ("submit", "queue", "worker", "encoding", "answer", "download")


def end_to_end(client: httpx.Client, size: int, steps: int, seed: int, priority: int | None = None) -> Trip:
    """One job through the stack: ``POST /generate?wait=`` until it comes back finished, then its PNG downloaded."""
    body = {"prompt": PROMPT, "height": size, "width": size, "num_steps": steps, "seed": seed}
    if priority is not None:
        body["priority"] = priority
    sent, t0 = time.time(), time.perf_counter()
    r = client.post("/generate", params={"wait": 600}, json=body)
    r.raise_for_status()
    answered, t_answered = time.time(), time.perf_counter()
    job = r.json()
    if job.get("status") != "succeeded":
        raise RuntimeError(f"job did not succeed in time: {job}")
    client.get(job["result"]["images"][0]["url"]).raise_for_status()
    t_end = time.perf_counter()
    timings = job["result"]["timings"]
    created, started = (datetime.fromisoformat(job[k]).timestamp() for k in ("created_at", "started_at"))
    worker_s = timings["total_s"]  # from the worker receiving the job to its result, stored just after
    phases = {"submit": created - sent, "queue": started - created,
              "worker": worker_s - timings["sampling_s"] - timings["encoding_s"], "encoding": timings["encoding_s"],
              "answer": answered - started - worker_s, "download": t_end - t_answered}
    return Trip(t_end - t0, timings["sampling_s"], phases)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` and its live child processes have used so far (Linux /proc): the
    gateway's own, or its supervisor's and its processes' with ``ECHO4O_GATEWAY_PROCESSES`` above 1."""
    total = 0.0
    for one in (pid, *_children(pid)):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a scan of /proc: not every kernel has /proc/PID/task/TID/children)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out
