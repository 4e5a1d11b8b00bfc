"""The benchmark section's pure helpers: the progress line, the runs table row, the report frame, the compare
table."""

from __future__ import annotations

from frontend_gradio.admin_benchmarks import RUN_COLUMNS, compare_markdown, progress_text, report_frame, run_row

RUN = {"id": "r1", "suite": "geneval_pp", "status": "running", "limit": 1, "model_version": "v1",
       "progress": {"stage": "generate", "step": 2, "total": 7, "detail": {"generated": 2, "images": 7, "pending": 5}},
       "image_jobs": {"succeeded": 4, "running": 1, "queued": 2}, "overall": None, "error": None,
       "created_at": "2026-12-02T00:00:00Z"}


def test_progress_line_counts_images_live_then_verdicts() -> None:
    assert progress_text(RUN) == "Run `r1` (geneval_pp): **running** · generated 4/7"
    judging = {**RUN, "progress": {"stage": "judge", "step": 3, "total": 7,
                                   "detail": {"generated": 7, "images": 7, "judged": 3, "to_judge": 7}}}
    assert progress_text(judging).endswith("generated 7/7 · judged 3/7")
    failed = {**RUN, "status": "failed", "error": {"code": "image_failed", "message": "image 0001_0.png ..."}}
    assert progress_text(failed).endswith("⚠️ image_failed: image 0001_0.png ...")
    done = {**RUN, "status": "succeeded", "overall": 0.5, "progress": {"stage": "done", "step": 7, "total": 7,
                                                                        "detail": {"judged": 7, "to_judge": 7}}}
    assert progress_text(done).endswith("judged 7/7 · overall 0.500")


def test_run_row_has_one_cell_per_column() -> None:
    row = run_row({**RUN, "overall": 0.25})
    assert len(row) == len(RUN_COLUMNS) and row[:3] == ["r1", "running", "geneval_pp"] and row[6] == "0.250"
    assert row[5] == "generate 2/7"


def test_report_frame_escapes_the_report() -> None:
    frame = report_frame("<h1 class=\"x\">A & B</h1>")
    assert "srcdoc=\"&lt;h1 class=&quot;x&quot;&gt;A &amp; B&lt;/h1&gt;\"" in frame


def test_compare_table_by_group_with_the_change() -> None:
    a = {"suite": "geneval_pp", "overall": 0.5, "groups": {"counting": 0.5, "color_attr": 1.0}}
    b = {"suite": "geneval_pp", "overall": 0.75, "groups": {"counting": 1.0, "color_attr": 0.5}}
    table = compare_markdown(a, b, "a" * 32, "b" * 32)
    assert "| **overall** | 0.500 | 0.750 | +0.250 |" in table
    assert "| counting | 0.500 | 1.000 | +0.500 |" in table and "| color_attr | 1.000 | 0.500 | -0.500 |" in table
    assert "do not compare" in compare_markdown(a, {**b, "suite": "imagine"}, "a", "b")
