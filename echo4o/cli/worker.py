"""``echo4o worker``: a GPU worker that loads the model once and runs queued jobs one at a time."""

from __future__ import annotations

import os
import sys

import typer

from echo4o.cli import app


@app.command()
def worker(
    queues: str = typer.Option("gpu", "--queues", "-Q", help="Comma-separated queues to serve: gpu, train."),
    gpu: int | None = typer.Option(None, "--gpu", min=0, help="CUDA device index N: runs on cuda:N."),
    model: str | None = typer.Option(
        None, "--model", help="Model folder (BAGEL layout, or one made by `echo4o make-tiny`) or Hub id."
    ),
    concurrency: int = typer.Option(
        1, "--concurrency", "-c", help="Jobs at once. Only 1: start one worker per GPU to use several."
    ),
) -> None:
    """Run a worker: load the model once, report ready, then run jobs from the queue one at a time."""
    if concurrency != 1:
        typer.echo(
            "error: --concurrency must be 1: a worker runs one job at a time on its GPU; "
            "start one `echo4o worker --gpu N` per GPU instead",
            err=True,
        )
        raise typer.Exit(2)
    # the flags override the environment; every component then reads them through get_settings()
    if model is not None:
        os.environ["ECHO4O_MODEL"] = model
    if gpu is not None:
        os.environ["ECHO4O_DEVICE"] = f"cuda:{gpu}"
    from echo4o.logging import setup_logging
    from echo4o.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)

    from worker.runtime import run_worker

    try:
        code = run_worker(queues=[q.strip() for q in queues.split(",") if q.strip()], loglevel=settings.log_level)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    sys.exit(code)
