"""``/admin/benchmarks`` on a live stack (embedded broker: ``echo4o serve`` with its own worker, the tiny model) and
the local judge: admin keys only, 422 naming the field, a run's progress on the job's event stream, the list,
the report in three formats and the run's images (no path traversal)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backend.test_gateway_live import read_events
from tests.evaluation.servers import JudgeLog, judge_server
from tests.support.stack import Stack, live_stack
from tests.support.worker_proc import POLL_S, WAIT_S

PROMPTS = ["a cat", "a dog"]
RUN = {"suite": "custom", "prompts": "bench/prompts.jsonl", "height": 32, "width": 32, "num_steps": 3}


@pytest.fixture(scope="module")
def judge() -> Iterator[tuple[str, JudgeLog]]:
    with judge_server() as served:
        yield served


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("bench-stack") / "data"
    (data_dir / "bench").mkdir(parents=True)
    lines = [json.dumps({"prompt": p, "include": [{"class": p.split()[-1], "count": 1}]}) for p in PROMPTS]
    (data_dir / "bench" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    with live_stack(model=tiny_model, data_dir=data_dir) as s:
        yield s


@pytest.fixture(scope="module")
def finished_run(stack: Stack, judge: tuple[str, JudgeLog]) -> dict:
    url, log = judge
    with stack.client("admin") as c:
        r = c.post("/admin/benchmarks", json={**RUN, "judge_url": url, "judge_model": "judge-m"})
        assert r.status_code == 202, r.text
        created = r.json()
        events = read_events(c, created["events_url"])
    assert events[-1][0] == "done", events[-1]
    # the stream polls the row: a fast phase may pass unseen, but every progress event it shows is the run's
    assert all(data["stage"] in ("generate", "judge", "done") for name, data in events if name == "progress")
    assert events[-1][1]["progress"]["detail"] == {"generated": 2, "images": 2, "judged": 2, "to_judge": 2}
    assert len(log.requests) == 2
    return events[-1][1]


def test_run_through_the_queue_reports_progress_and_scores(stack: Stack, finished_run: dict) -> None:
    assert finished_run["kind"] == "benchmark" and finished_run["status"] == "succeeded"
    assert finished_run["result"]["details"]["overall"] == 1.0
    with stack.client("admin") as c:
        children = [j for j in c.get("/jobs", params={"all": True, "limit": 100}).json()["data"]
                    if j["kind"] == "generate" and j["params"]["height"] == RUN["height"]]  # this run's
        runs = c.get("/admin/benchmarks").json()
        one = c.get(f"/admin/benchmarks/{finished_run['id']}").json()
    assert len(children) == 2 and all(j["status"] == "succeeded" for j in children)
    assert {j["params"]["prompt"] for j in children} == set(PROMPTS)
    listed = next(r for r in runs["data"] if r["id"] == finished_run["id"])
    assert runs["count"] == len(runs["data"]) >= 1 and listed["status"] == "succeeded"
    assert [r["created_at"] for r in runs["data"]] == sorted((r["created_at"] for r in runs["data"]), reverse=True)
    assert one["image_jobs"] == {"succeeded": 2} and listed["image_jobs"] == {"succeeded": 2}
    assert one["overall"] == 1.0 and one["suite"] == "custom" and one["judge_model"] == "judge-m"
    assert one["report_url"].endswith(f"/admin/benchmarks/{finished_run['id']}/report")


def test_report_in_three_formats_and_its_images(stack: Stack, finished_run: dict) -> None:
    run_id = finished_run["id"]
    with stack.client("admin") as c:
        html = c.get(f"/admin/benchmarks/{run_id}/report")
        md = c.get(f"/admin/benchmarks/{run_id}/report", params={"format": "md"})
        summary = c.get(f"/admin/benchmarks/{run_id}/report", params={"format": "json"})
        inline = c.get(f"/admin/benchmarks/{run_id}/report", params={"inline": True})
        image = c.get(f"/admin/benchmarks/{run_id}/images/0001_0.png")
        traversal = c.get(f"/admin/benchmarks/{run_id}/images/..%2F..%2Fecho4o.db")
        dotted = c.get(f"/admin/benchmarks/{run_id}/images/0001_0.png.bak")
        absent = c.get(f"/admin/benchmarks/{run_id}/images/0009_0.png")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "src='images/0001_0.png'" in html.text and "<h1>Custom benchmark</h1>" in html.text
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert summary.json()["overall"] == 1.0 and summary.json()["counts"]["images"] == 2
    assert "src='data:image/png;base64," in inline.text and "src='images/" not in inline.text
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert traversal.status_code in (404, 422) and traversal.json()["error"]["param"] in ("name", None)
    assert dotted.status_code == 422 and dotted.json()["error"]["param"] == "name"
    assert absent.status_code == 404


def test_admin_only_unknown_runs_and_bad_fields(stack: Stack, finished_run: dict, judge: tuple[str, JudgeLog]) -> None:
    url, _ = judge
    run_id = finished_run["id"]
    with stack.client("user") as c:
        for method, path in (("post", "/admin/benchmarks"), ("get", "/admin/benchmarks"),
                             ("get", "/admin/benchmarks/options"),
                             ("get", f"/admin/benchmarks/{run_id}/report"),
                             ("get", f"/admin/benchmarks/{run_id}/images/0001_0.png")):
            r = getattr(c, method)(path, **({"json": {**RUN, "judge_url": url}} if method == "post" else {}))
            assert r.status_code == 403, (path, r.text)
    with stack.client("admin") as c:
        before = c.get("/admin/benchmarks").json()["count"]
        options = c.get("/admin/benchmarks/options").json()
        assert options["suites"] == ["geneval_pp", "imagine", "geneval", "custom"]
        assert options["model_versions"][0] == "echo4o-tiny" and options["judge_url"] is None
        assert c.get("/admin/benchmarks/nope/report").status_code == 404
        image_job = next(j for j in c.get("/jobs", params={"all": True}).json()["data"] if j["kind"] == "generate")
        unknown = c.get(f"/admin/benchmarks/{image_job['id']}")  # a job, but not a run
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "run_id"
        cases = [({"suite": "nope"}, "suite"), ({"suite": "custom", "judge_url": url}, "prompts"),
                 ({**RUN, "prompts": "../etc/passwd", "judge_url": url}, "prompts"),
                 ({**RUN, "prompts": "bench/missing.jsonl", "judge_url": url}, "prompts"),
                 ({**RUN, "judge_url": "ftp://judge"}, "judge_url"), ({**RUN}, "judge_url"),
                 ({**RUN, "judge_url": url, "height": 33}, "height"), ({**RUN, "judge_url": url, "limit": 0}, "limit"),
                 ({**RUN, "judge_url": url, "compare_to": "0" * 32}, "compare_to"),
                 ({**RUN, "judge_url": url, "model_version": "not/served"}, "model_version")]
        for body, param in cases:
            r = c.post("/admin/benchmarks", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.json())
        assert c.get("/admin/benchmarks").json()["count"] == before  # nothing was queued


def test_cancel_stops_the_run_and_its_image_jobs(stack: Stack, judge: tuple[str, JudgeLog]) -> None:
    url, log = judge
    asked = len(log.requests)
    with stack.client("admin") as c:
        r = c.post("/admin/benchmarks", json={**RUN, "height": 16, "width": 16, "num_steps": 100, "judge_url": url})
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        deadline = time.monotonic() + WAIT_S
        while c.get(f"/admin/benchmarks/{run_id}").json()["image_jobs"].get("running", 0) < 1:
            assert time.monotonic() < deadline, "no image job of the run started"
            time.sleep(POLL_S)
        assert c.delete(f"/jobs/{run_id}").status_code == 200
    run = stack.wait_job(run_id, key="admin")
    assert run["status"] == "cancelled", run
    with stack.client("admin") as c:
        view = c.get(f"/admin/benchmarks/{run_id}").json()
    assert view["image_jobs"] == {"cancelled": 2}, view  # the running one stopped, the queued one never ran
    assert len(log.requests) == asked


def test_compare_to_puts_the_other_run_beside_this_one(stack: Stack, finished_run: dict,
                                                       judge: tuple[str, JudgeLog]) -> None:
    url, _ = judge
    with stack.client("admin") as c:
        r = c.post("/admin/benchmarks", json={**RUN, "height": 48, "width": 48, "judge_url": url,
                                              "compare_to": finished_run["id"]})
        assert r.status_code == 202, r.text
        run = stack.wait_job(r.json()["id"], key="admin")
        assert run["status"] == "succeeded", run
        summary = c.get(f"/admin/benchmarks/{run['id']}/report", params={"format": "json"}).json()
        html = c.get(f"/admin/benchmarks/{run['id']}/report").text
    assert summary["compare"]["overall"] == 1.0 and summary["compare"]["groups"] == {"custom": 1.0}
    assert "(before: 1.000, change +0.000)" in html
