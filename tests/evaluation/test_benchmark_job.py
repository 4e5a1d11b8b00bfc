"""Benchmark jobs through the queue, on real worker subprocesses (embedded broker) and the local judge.

One worker runs a whole run: the run's images are ordinary image jobs that it takes between the run's own
phases. A run killed mid-generation and again mid-judging resumes: finished image jobs are not run again and
cached verdicts are not asked again.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from echo4o.db import session_scope, upgrade_to_head
from echo4o.db.models import Job
from echo4o.jobs import MAX_STEPS, parse_job
from tests.evaluation.servers import judge_server
from tests.support.benchmarks import shared_benchmarks_dir
from tests.support.worker_proc import WAIT_S, WorkerProcess, _poll_job, wait_for_job, wait_for_progress
from tests.worker.jobs_support import submit_raw, use_env, worker_env
from worker.evaluation.job import child_job_id

PROMPTS = ["a cat", "a dog", "a red ball"]
SHARED = shared_benchmarks_dir()


def _write_prompts(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p, "include": [{"class": p.split()[-1], "count": 1}]}) for p in PROMPTS]
    (data_dir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return "prompts.jsonl"


def _submit_run(**params: object) -> str:
    """Validate like the gateway, write the run's row, enqueue it; returns its id."""
    return submit_raw("benchmark", parse_job("benchmark", params).model_dump(mode="json"))


def _judged_one(job: Job) -> bool:
    assert job.status in ("queued", "running"), (job.status, job.error_code, job.error_message)
    return job.progress_stage == "judge" and job.progress_step >= 1


def _children(run_id: str) -> list[Job]:
    with session_scope() as s:
        rows = s.scalars(sa.select(Job).where(Job.parent_id == run_id).order_by(Job.created_at)).all()
        s.expunge_all()
        return list(rows)


def test_killed_run_resumes_without_regenerating_images_or_reasking_verdicts(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    # one image job at a time (no cross-request batching), so the kill lands after the first image has ended
    use_env(monkeypatch, worker_env(data_dir, tiny_model, ECHO4O_BATCH_MAX_SIZE="1"))
    prompts = _write_prompts(data_dir)
    release = threading.Event()
    with judge_server(hold_after=1, release=release) as (url, judge_log):
        # images long enough (MAX_STEPS: about 0.1 s each on a fast machine) to be seen mid-sampling
        run_id = _submit_run(suite="custom", prompts=prompts, height=64, width=64, num_steps=MAX_STEPS, seed=7,
                             judge_url=url, judge_model="judge-m")
        second_image = child_job_id(run_id, "0002_0.png")

        # 1. killed while the run's second image is sampling: the first image job has finished
        with WorkerProcess(model=tiny_model, log_path=tmp_path / "w1.log") as w1:
            wait_for_progress(second_image, worker=w1)
            w1.kill()
        with session_scope() as s:
            run = s.get(Job, run_id)
            # the run's progress moved with its first image, before any phase of the run counted it
            assert (run.progress_stage, run.progress_step, run.progress_total) == ("generate", 1, 3)
            assert run.progress_detail == {"generated": 1, "images": 3, "pending": 2}
        first = _children(run_id)[0]
        assert first.id == child_job_id(run_id, "0001_0.png") and first.status == "succeeded"
        first_png = data_dir / first.result["images"][0]
        first_mtime = first_png.stat().st_mtime_ns

        # 2. the next worker finishes the images; killed while the judge holds all but the first verdict
        with WorkerProcess(model=tiny_model, log_path=tmp_path / "w2.log") as w2:
            # stage judge, step 1: the first verdict is in the run's cache
            _poll_job(run_id, _judged_one, what="one verdict", timeout_s=WAIT_S, database_url=None, worker=w2)
            w2.kill()
        release.set()
        answered_before = {r["instruction"] for r in judge_log.requests if r["status"] == 200}
        assert len(answered_before) >= 1

        # 3. a third worker judges what is missing and finishes the run
        n_before = len(judge_log.requests)
        with WorkerProcess(model=tiny_model, log_path=tmp_path / "w3.log") as w3:
            run = wait_for_job(run_id, worker=w3)
    assert run.status == "succeeded", (run.error_code, run.error_message)

    children = _children(run_id)
    assert [c.id for c in children] == [child_job_id(run_id, f"{i:04d}_0.png") for i in (1, 2, 3)]
    assert all(c.status == "succeeded" for c in children)
    assert children[0].attempts == 1 and first_png.stat().st_mtime_ns == first_mtime  # not generated again
    assert children[1].attempts == 2  # the interrupted one ran again
    asked_after = [r["instruction"] for r in judge_log.requests[n_before:]]
    assert not answered_before & set(asked_after)  # cached verdicts were not asked again
    assert sorted(set(asked_after) | answered_before) == sorted(PROMPTS)

    out = data_dir / "benchmarks" / run_id
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["counts"]["images"] == 3
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0001_0.png", "0002_0.png", "0003_0.png"]
    assert (out / "images" / "0001_0.png").read_bytes() == first_png.read_bytes()
    assert run.result["overall"] == 1.0 and run.result["report"] == f"benchmarks/{run_id}/report.html"
    assert run.progress_detail["judged"] == 3 or run.progress_stage == "done"


def test_failed_image_fails_the_run_naming_it(tmp_path: Path, tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model))
    prompts = _write_prompts(data_dir)
    run_id = _submit_run(suite="custom", prompts=prompts, limit=1, height=32, width=32, num_steps=3,
                    model_version="not-served", judge_url="http://127.0.0.1:9/v1")
    with WorkerProcess(model=tiny_model, log_path=tmp_path / "w.log") as w:
        run = wait_for_job(run_id, worker=w)
    assert run.status == "failed" and run.error_code == "image_failed"
    assert "0001_0.png" in run.error_message and "model_unavailable" in run.error_message


def test_public_suite_from_the_pinned_file_in_the_data_dir(tmp_path: Path, tiny_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``prompts``: the pinned GenEval++ file kept under <data_dir>/benchmarks/geneval_pp/ (here a copy of the
    shared one, whose sha256 is the pinned one, so nothing is downloaded); limit 1 keeps one prompt per tag."""
    from worker.evaluation.suites import GENEVAL_PP_TAGS, SOURCES

    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model))
    pinned = data_dir / "benchmarks" / "geneval_pp" / SOURCES["geneval_pp"].filename
    pinned.parent.mkdir(parents=True)
    pinned.write_bytes((SHARED / "geneval_plus_plus.jsonl").read_bytes())
    with judge_server() as (url, judge_log):
        run_id = _submit_run(suite="geneval_pp", limit=1, height=16, width=16, num_steps=2, judge_url=url)
        with WorkerProcess(model=tiny_model, log_path=tmp_path / "w.log") as w:
            run = wait_for_job(run_id, worker=w)
    assert run.status == "succeeded", (run.error_code, run.error_message)
    summary = json.loads((data_dir / "benchmarks" / run_id / "summary.json").read_text())
    assert summary["prompts"]["pinned"] is True and summary["counts"]["images"] == len(GENEVAL_PP_TAGS)
    assert list(summary["groups"]) == list(GENEVAL_PP_TAGS) and len(judge_log.requests) == len(GENEVAL_PP_TAGS)
    assert len(_children(run_id)) == len(GENEVAL_PP_TAGS)


def test_image_rows_a_dead_phase_never_enqueued_are_enqueued_on_recovery(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state a worker leaves when it dies inside a phase, between writing an image job's row and sending it:
    the run ``running`` on a dead worker, one image row ``queued`` with no message. The next worker requeues the
    run; its phase sends the row again, and the run finishes with that very image job."""
    import socket

    from echo4o.db import crud
    from worker.evaluation.job import _create_child, load_run

    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model))
    prompts = _write_prompts(data_dir)
    with judge_server() as (url, judge_log):
        params = parse_job("benchmark", {"suite": "custom", "prompts": prompts, "limit": 1, "height": 16,
                                         "width": 16, "num_steps": 2, "judge_url": url})
        upgrade_to_head()
        with session_scope() as s:
            run = crud.create_job(session=s, kind="benchmark", params=params.model_dump(mode="json"),
                                  model_version="echo4o-tiny", priority=0)
            run_id = run.id
            assert crud.mark_running(session=s, job_id=run_id, worker=f"{socket.gethostname()}:999999999", gpu=None)
            records, _, generation = load_run(params, data_dir)
            orphan = child_job_id(run_id, "0001_0.png")
            assert _create_child(s, run_id, orphan, records[0], 0, generation, params, "anonymous", "echo4o-tiny",
                                 data_dir)
        with WorkerProcess(model=tiny_model, log_path=tmp_path / "w.log") as w:
            done = wait_for_job(run_id, worker=w)
    assert done.status == "succeeded", (done.error_code, done.error_message)
    assert [(c.id, c.status) for c in _children(run_id)] == [(orphan, "succeeded")]
    assert len(judge_log.requests) == 1


def test_two_workers_share_a_runs_images(tmp_path: Path, tiny_model: Path, redis_url: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis and two workers: the run's image jobs are spread over both, each runs once, the run finishes."""
    data_dir = tmp_path / "data"
    use_env(monkeypatch, worker_env(data_dir, tiny_model, ECHO4O_BROKER_URL=redis_url))
    prompts = _write_prompts(data_dir)
    with judge_server() as (url, judge_log):
        with WorkerProcess(model=tiny_model, log_path=tmp_path / "a.log") as a, \
                WorkerProcess(model=tiny_model, log_path=tmp_path / "b.log") as b:
            run_id = _submit_run(suite="custom", prompts=prompts, images_per_prompt=2, height=16, width=16,
                                 num_steps=20, judge_url=url)
            run = wait_for_job(run_id, worker=a)
            assert b.alive()
    assert run.status == "succeeded", (run.error_code, run.error_message)
    children = _children(run_id)
    assert len(children) == 6 and all(c.status == "succeeded" and c.attempts == 1 for c in children)
    assert {c.worker for c in children} == {a.worker_id, b.worker_id}
    assert len(judge_log.requests) == 6
