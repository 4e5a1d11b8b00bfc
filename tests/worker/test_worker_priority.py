"""``ECHO4O_WORKER_NICE``: a worker lowers the CPU priority of all its threads, those running when it starts and
those started later (the model's, Celery's, the heartbeat's), and runs its jobs at that priority."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.worker_proc import REPO_ROOT, WorkerProcess, wait_for_job
from tests.worker.jobs_support import QUICK, submit, use_env, worker_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread priorities in /proc")


def thread_nice(pid: int) -> dict[int, int]:
    """``{tid: nice}`` of every thread of ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        values[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return values


CHILD = """
import json, os, threading
from worker.runtime import lower_cpu_priority
from pathlib import Path
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
nice = lower_cpu_priority(int(os.environ["INCREMENT"]))
after = threading.Thread(target=stop.wait); after.start()
def nice_of(tid):
    return int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])
print(json.dumps({"returned": nice, "main": nice_of(threading.get_native_id()),
                  "before": nice_of(before.native_id), "after": nice_of(after.native_id)}))
stop.set()
"""


def run_child(increment: int) -> dict[str, int]:
    env = {**os.environ, "INCREMENT": str(increment), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("increment", [0, 3])
def test_threads_running_before_and_started_after_get_the_lower_priority(increment: int) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the child inherits the test's own nice value
    expected = min(19, base + increment)
    assert run_child(increment) == {"returned": expected, "main": expected, "before": expected, "after": expected}


def test_a_worker_runs_its_jobs_at_the_nice_value_it_is_given(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    use_env(monkeypatch, worker_env(tmp_path / "data", tiny_model))
    with WorkerProcess(model=tiny_model, env={"ECHO4O_WORKER_NICE": "5"}, log_path=tmp_path / "w.log") as worker:
        job = wait_for_job(submit(prompt="low priority", seed=3, **QUICK), worker=worker)
        assert job.status == "succeeded", (job.error_code, job.error_message)
        values = thread_nice(worker.pid)  # the job's threads too: torch's pool exists from the warm-up on
        assert len(values) > 1 and set(values.values()) == {min(19, base + 5)}, values
        assert "worker CPU priority lowered" in worker.logs()
