"""The ``echo4o bench`` command: load a suite, generate with a local model, judge, score, report.

Registered by the CLI package (``echo4o/cli/``) as ``app.command("bench")(bench)``; torch and the engine are
imported only when the command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from echo4o.jobs import DEFAULT_SIZE, DEFAULT_STEPS
from worker.evaluation.suites import SUITES


def bench(
    suite: Annotated[str, typer.Option(help=f"Benchmark suite: {', '.join(SUITES)}.")],
    model: Annotated[str, typer.Option(help="Model directory (or Hugging Face id) to generate with.")],
    out: Annotated[Path, typer.Option(help="Run directory; running again on it resumes the run.")],
    judge_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible API root of the judge, e.g. https://api.openai.com/v1 or http://localhost:8000/v1. "
             "Default: ECHO4O_JUDGE_URL."
    )] = None,
    judge_model: Annotated[str | None, typer.Option(help="Judge model name. Default: ECHO4O_JUDGE_MODEL "
                                                         "(gpt-4.1-2025-04-14).")] = None,
    judge_key_env: Annotated[str, typer.Option(help="Environment variable holding the judge's API key, read when "
                                                    "ECHO4O_JUDGE_API_KEY is unset.")] = "OPENAI_API_KEY",
    prompts: Annotated[Path | None, typer.Option(help="Prompt file (required for custom; otherwise the pinned "
                                                      "public file is downloaded into --cache-dir).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where downloaded prompt files are kept. Default: "
                                                        "<ECHO4O_DATA_DIR>/benchmarks.")] = None,
    limit: Annotated[int | None, typer.Option(help="First N prompts of each tag or type.")] = None,
    images_per_prompt: Annotated[int | None, typer.Option(help="Images per prompt (default: the paper's: 4 for "
                                                                "GenEval, else 1).")] = None,
    height: Annotated[int, typer.Option(help="Image height (the paper: 1024).")] = DEFAULT_SIZE[0],
    width: Annotated[int, typer.Option(help="Image width (the paper: 1024).")] = DEFAULT_SIZE[1],
    steps: Annotated[int, typer.Option(help="Sampling steps (schedule points; the paper: 50).")] = DEFAULT_STEPS,
    seed: Annotated[int, typer.Option(help="Seed of each prompt's first image.")] = 42,
    concurrency: Annotated[int, typer.Option(help="Judge requests in flight.")] = 4,
    rpm: Annotated[float | None, typer.Option(help="Judge requests per minute at most.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    detector: Annotated[str | None, typer.Option(help="GenEval's object detector, package.module:function. "
                                                     "Default: ECHO4O_GENEVAL_DETECTOR.")] = None,
    compare: Annotated[Path | None, typer.Option(help="Another run's directory, shown side by side.")] = None,
) -> None:
    """Run a benchmark suite on a model and write DIR/summary.json, report.md and report.html."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from echo4o.jobs import describe_validation_error
    from echo4o.settings import get_settings
    from worker.evaluation.judge import JudgeConfig
    from worker.evaluation.report import load_summary
    from worker.evaluation.runner import paper_settings, pipeline_generate, run_benchmark
    from worker.evaluation.suites import limit_per_group, load_suite

    if suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}", param_hint="--suite")
    settings_ = get_settings()
    judge_url = judge_url or settings_.judge_url or None
    judge_model = judge_model or settings_.judge_model
    cache_dir = cache_dir or settings_.data_dir / "benchmarks"
    if suite != "geneval" and judge_url is None:
        raise typer.BadParameter(f"{suite} is scored by a judge: give --judge-url (and --judge-model)",
                                 param_hint="--judge-url")
    from worker.evaluation.detector import DetectorConfigError, load_detector

    try:
        geneval_detector = load_detector(detector or settings_.geneval_detector) if suite == "geneval" else None
    except DetectorConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--detector") from None
    records, source = load_suite(suite, prompts, cache_dir=cache_dir)
    records = limit_per_group(records, limit)
    overrides = {"height": height, "width": width, "num_steps": steps, "seed": seed}
    if images_per_prompt is not None:
        overrides["images_per_prompt"] = images_per_prompt
    try:
        settings = paper_settings(suite, **overrides)
    except ValidationError as exc:
        raise typer.BadParameter(describe_validation_error(exc), param_hint="--height/--width/--steps/--seed") from None
    judge = None
    if judge_url is not None:
        key = (settings_.judge_api_key.get_secret_value() if settings_.judge_api_key
               else os.environ.get(judge_key_env))
        judge = JudgeConfig(base_url=judge_url, model=judge_model, api_key=key, max_concurrency=concurrency,
                            requests_per_minute=rpm)

    from worker.engine.pipeline import Echo4oPipeline

    pipe = Echo4oPipeline.from_pretrained(model, device=device, dtype=dtype)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="img")
        bar.n = done
        bar.refresh()

    try:
        summary = run_benchmark(records, out, suite=suite, generate=pipeline_generate(pipe, settings),
                                generation=settings, judge=judge, progress=progress, limit=limit,
                                suite_file=source, model={"path": str(model), "name": Path(str(model)).name},
                                detector=geneval_detector,
                                compare=load_summary(compare) if compare else None)
    finally:
        for bar in bars.values():
            bar.close()
    overall = summary["overall"]
    typer.echo(f"{suite}: overall {overall if overall is not None else 'n/a'}; report: {out / 'report.html'}")
    for note in summary["notes"]:
        typer.echo(f"note: {note}")
