"""The bench command, run through typer on a custom suite with the tiny model and the local judge."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from tests.evaluation.servers import judge_server
from worker.evaluation.cli import bench


def test_bench_command_writes_summary(tiny_model, tmp_path):
    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)  # two commands: typer keeps "bench" as a subcommand
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "include": [{"class": "cat", "count": 1}]}) + "\n")
    with judge_server() as (url, log):
        result = CliRunner().invoke(app, ["bench", "--suite", "custom", "--prompts", str(prompts), "--model",
                                          str(tiny_model), "--out", str(tmp_path / "run"), "--judge-url", url,
                                          "--judge-model", "m", "--height", "64", "--width", "64", "--steps", "3",
                                          "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "custom: overall 1.0" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["settings"]["num_steps"] == 3 and len(log.requests) == 1

    refused = CliRunner().invoke(app, ["bench", "--suite", "imagine", "--model", "x", "--out", str(tmp_path)])
    flat = " ".join(refused.output.replace("│", " ").split())  # rich wraps the message in a box
    assert refused.exit_code == 2 and "imagine is scored by a judge: give --judge-url" in flat
