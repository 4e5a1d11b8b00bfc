"""``echo4o worker``: a GPU worker that loads the model once and runs queued jobs one at a time."""

from __future__ import annotations

import os
import sys

import typer

from echo4o.cli import app

#: Exit codes of `echo4o worker` that mean it could not start; `echo4o serve` stops when its embedded worker
#: exits with one of them, since no job would ever run.
EXIT_BAD_SETTING = 2
EXIT_MODEL_UNAVAILABLE = 3
STARTUP_FAILURES = (EXIT_BAD_SETTING, EXIT_MODEL_UNAVAILABLE)


@app.command()
def worker(
    queues: str = typer.Option(
        "gpu", "--queues", "-Q",
        help="Comma-separated queues to serve: gpu (image jobs), train (fine-tuning jobs).",
    ),
    gpu: int | None = typer.Option(None, "--gpu", min=0, help="CUDA device index N: runs on cuda:N."),
    model: str | None = typer.Option(
        None, "--model", help="Model folder (BAGEL layout, or one made by `echo4o make-tiny`) or Hub id."
    ),
) -> None:
    """Run a worker: load the model once, report ready, then run jobs from the queue one at a time (to use
    several GPUs, start one worker per GPU with --gpu N).

    Exits 2 on a bad setting and 3 when the model cannot be had (missing folder, unknown Hub id, no network),
    each with one `error:` line naming the fix."""
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

    from worker.engine.loading import CheckpointError
    from worker.runtime import run_worker

    try:
        code = run_worker(queues=[q.strip() for q in queues.split(",") if q.strip()], loglevel=settings.log_level)
    except ValueError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(EXIT_BAD_SETTING) from None
    except CheckpointError as exc:
        typer.echo(f"error: cannot load the model {settings.model!r}: {_one_line(exc)}", err=True)
        raise typer.Exit(EXIT_MODEL_UNAVAILABLE) from None
    sys.exit(code)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
