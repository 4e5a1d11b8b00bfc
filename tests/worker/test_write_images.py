"""A job's result files: a rerun after a kill mid-write leaves exactly its images, no temp file of the dead attempt."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from echo4o.pnginfo import params_from_png
from worker.tasks import write_images


def test_a_rerun_removes_the_temp_file_a_killed_attempt_left(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "job1"
    folder.mkdir(parents=True)
    (folder / ".0.png.20x0hadt.tmp").write_bytes(b"\x89PNG half")  # what a SIGKILL during write_png leaves
    (folder / "notes.txt").write_text("not ours to remove")
    images = [Image.new("RGB", (16, 16), (200, 10, 10)), Image.new("RGB", (16, 16), (10, 200, 10))]
    rel = write_images("job1", images, {"prompt": "a red cube", "seed": 3}, tmp_path)
    assert rel == ["results/job1/0.png", "results/job1/1.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "notes.txt"]
    assert params_from_png(folder / "1.png")["image_index"] == 1
