"""The fine-tuning section's pure helpers: the request body from the form, the progress line, the plot's
frame, the versions table."""

from __future__ import annotations

import pytest

from frontend_gradio.admin_finetune import finetune_request, loss_frame, progress_line, run_summary, version_rows


def test_the_form_becomes_the_request_body_and_bad_input_names_the_form_field() -> None:
    assert finetune_request(" /d ", "full", 10.0, "", "") == {"dataset": "/d", "mode": "full", "steps": 10}
    body = finetune_request("/d", "lora", None, "2e-5", '{"save_every": 5}')
    assert body == {"dataset": "/d", "mode": "lora", "lr": 2e-5, "save_every": 5}
    with pytest.raises(ValueError, match="learning rate: 'fast' is not a number"):
        finetune_request("/d", "lora", None, "fast", "")
    with pytest.raises(ValueError, match="more fields: give a JSON object"):
        finetune_request("/d", "lora", None, "", "[1, 2]")
    with pytest.raises(ValueError, match="more fields: not JSON"):
        finetune_request("/d", "lora", None, "", "{save_every: 5}")


def test_progress_line_plot_frame_and_version_rows() -> None:
    data = {"step": 3, "total": 10, "detail": {"loss": 0.25, "lr": 2e-5, "samples_per_s": 1.5, "eta_s": 14.2,
                                               "skipped_rows": 2}}
    assert progress_line(data) == "step 3/10 · loss 0.2500 · lr 2.00e-05 · 1.50 samples/s · ETA 14 s · 2 rows skipped"
    frame = loss_frame([[1, 0.5], [2, 0.25]])
    assert frame["step"].tolist() == [1, 2] and frame["loss"].tolist() == [0.5, 0.25]
    empty = loss_frame(None)
    assert len(empty) == 0 and str(empty["loss"].dtype) == "float64"  # typed: the plot's y axis stays numeric
    rows = version_rows({"data": [{"ref": "m/v1", "current": True, "source": "finetune", "created_at":
                                   "2026-12-02T00:00:00.123", "manifest": {"steps": 4, "final_loss": 0.5,
                                                                           "parent": "m"}}]})
    assert rows == [["m/v1", "✓", "finetune", 4, "0.5000", "m", "2026-12-02T00:00:00"]]


def test_run_summary_of_each_state() -> None:
    done = {"id": "j1", "status": "succeeded", "progress": {}, "result": {"details": {
        "version": "m/v1", "steps": 4, "losses": [[1, 0.5], [4, 0.2]]}}}
    line, frame = run_summary(done)
    assert line == "last run `j1`: done, version `m/v1` (4 steps)" and frame["step"].tolist() == [1, 4]
    running = {"id": "j2", "status": "running", "progress": {"step": 2, "total": 9, "detail": {
        "loss": 0.5, "losses": [[1, 0.6], [2, 0.5]]}}}
    line, frame = run_summary(running)
    assert line == "last run `j2`: step 2/9 · loss 0.5000" and len(frame) == 2
    failed = {"id": "j3", "status": "failed", "progress": {}, "error": {"code": "invalid_dataset",
                                                                        "message": "no usable row"}}
    assert run_summary(failed)[0] == "last run `j3`: ⚠️ failed (invalid_dataset): no usable row"
