"""GenEval's detector is configured by naming a callable (ECHO4O_GENEVAL_DETECTOR / --detector); the bench command
runs GenEval through it end to end with the tiny model, and a bad name is refused before any model loads."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from tests.support.benchmarks import shared_benchmarks_dir
from worker.evaluation.cli import bench
from worker.evaluation.detector import DetectorConfigError, load_detector


@pytest.fixture
def detector_module(tmp_path, monkeypatch):
    """A detector package on sys.path that calls every image with one object correct, others not."""
    (tmp_path / "my_detector.py").write_text(textwrap.dedent('''
        CALLS = []

        def detect(record, image):
            CALLS.append(record.id)
            correct = sum(item.get("count", 1) for item in record.include) == 1
            return {"correct": correct, "reason": f"{len(record.include)} classes"}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_detector:detect"
    sys.modules.pop("my_detector", None)


def test_load_detector_names_what_is_wrong(detector_module):
    fn = load_detector(detector_module)
    assert callable(fn) and fn.name == detector_module
    assert load_detector("") is None
    for spec, words in (("nocolon", "must be 'package.module:function'"), ("no_such_mod_xyz:f", "cannot import"),
                        ("my_detector:missing", "has no callable 'missing'")):
        with pytest.raises(DetectorConfigError, match=words):
            load_detector(spec)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)
    return app


def test_bench_scores_geneval_with_the_configured_detector(tiny_model, tmp_path, detector_module, monkeypatch):
    monkeypatch.setenv("ECHO4O_GENEVAL_DETECTOR", detector_module)
    from echo4o.settings import get_settings

    get_settings.cache_clear()
    out = tmp_path / "run"
    result = CliRunner().invoke(_app(), [
        "bench", "--suite", "geneval", "--prompts", str(shared_benchmarks_dir() / "geneval_evaluation_metadata.jsonl"),
        "--limit", "1", "--images-per-prompt", "1", "--model", str(tiny_model), "--out", str(out),
        "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    import my_detector

    assert len(my_detector.CALLS) == summary["counts"]["images"] > 1  # one image per GenEval tag, all detected
    assert summary["detector"] == detector_module
    # single_object prompts ask for one object (correct), two_object for two (not); overall: the mean of the tags
    tags = summary["groups"]
    assert tags["single_object"] == 1.0 and tags["two_object"] == 0.0
    assert summary["overall"] == pytest.approx(sum(tags.values()) / len(tags))


def test_bench_refuses_a_bad_detector_before_loading_a_model(tmp_path):
    result = CliRunner().invoke(_app(), ["bench", "--suite", "geneval", "--model", "/nonexistent", "--out",
                                         str(tmp_path / "run"), "--detector", "nocolon"])
    flat = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "must be 'package.module:function'" in flat
