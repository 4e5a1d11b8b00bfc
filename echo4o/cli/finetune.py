"""``echo4o finetune``: fine-tune a model folder on local data with the trainer the ``train`` workers run
(:class:`worker.training.trainer.Trainer`), showing a progress bar (loss, lr, samples/s, ETA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from echo4o.cli import app

#: Exit code of a run that could not start or use its data (the message names the option at fault).
EXIT_BAD_INPUT = 2
#: Exit code of a run that failed while training.
EXIT_TRAINING_FAILED = 1


@app.command()
def finetune(
    model: str = typer.Option(..., "--model", help="Base model: a folder in BAGEL's released layout or a Hub id."),
    data: str = typer.Option(..., "--data", help="Parquet file, folder of parquet files / Echo-4o-Image shards, "
                                                 "or a Hub dataset id (see docs/training.md)."),
    out: Path = typer.Option(..., "--out", help="Output folder: checkpoints, TensorBoard events and the finished "
                                                "version (released layout + manifest.json). A folder with "
                                                "checkpoints is resumed from its newest one."),
    mode: str | None = typer.Option(None, "--mode", help="lora or full (default: the trainer's)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: the trainer's)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: the trainer's)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", min=0, help="Linear warm-up steps."),
    save_every: int | None = typer.Option(None, "--save-every", min=1, help="Checkpoint every N steps."),
    expected_tokens: int | None = typer.Option(None, "--expected-tokens", min=1,
                                               help="Token budget of one step's pack (give --max-tokens too)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="Most tokens in one pack and in one sample."),
    vae_min_size: int | None = typer.Option(None, "--vae-min-size", min=16, help="Shortest image side at least."),
    vae_max_size: int | None = typer.Option(None, "--vae-max-size", min=16, help="Longest image side at most."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of the data order, noise and LoRA init."),
) -> None:
    """Fine-tune MODEL on DATA for --steps steps and write the new version to --out.

    Exits 2 when the settings or the data cannot be used (one `error:` line naming the problem and the fix),
    1 when training fails."""
    from pydantic import ValidationError

    from echo4o.logging import setup_logging

    setup_logging("WARNING", "text")
    from worker.training.data import DataError
    from worker.training.trainer import TrainConfig, Trainer, TrainingError

    given: dict[str, Any] = {
        "mode": mode, "total_steps": steps, "lr": lr, "warmup_steps": warmup_steps, "save_every": save_every,
        "expected_tokens": expected_tokens, "max_tokens": max_tokens,
        "max_tokens_per_sample": max_tokens, "vae_min_size": vae_min_size, "vae_max_size": vae_max_size,
        "seed": seed,
    }
    try:
        config = TrainConfig(base_model=model, data=data, output_dir=str(out), device=device,
                             **{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        _exit(EXIT_BAD_INPUT, "; ".join(_option_error(e) for e in exc.errors()))
    try:
        trainer = Trainer(config)
        trainer.setup()
        if trainer.step:
            typer.echo(f"resuming {out} from step {trainer.step}", err=True)
        with _ProgressBar(trainer.step, config.total_steps) as bar:
            trainer.callback = bar.update
            manifest = trainer.train()
    except DataError as exc:
        _exit(EXIT_BAD_INPUT, f"--data: {exc}")
    except TrainingError as exc:
        _exit(EXIT_TRAINING_FAILED, str(exc))
    except ValueError as exc:  # a base model that cannot be loaded, a bad device
        _exit(EXIT_BAD_INPUT, str(exc))
    skipped = manifest["data"].get("skipped", 0)
    typer.echo(f"wrote {out}: {manifest['steps']} steps, final loss {manifest['final_loss']:.4f}, "
               f"{skipped} data rows skipped; TensorBoard: tensorboard --logdir {out / 'tensorboard'}")


_OPTION_OF_FIELD = {"total_steps": "--steps", "max_tokens_per_sample": "--max-tokens", "base_model": "--model",
                    "data": "--data", "output_dir": "--out"}


def _option_error(err: Any) -> str:
    field = str(err["loc"][0]) if err.get("loc") else ""
    option = _OPTION_OF_FIELD.get(field) or ("--" + field.replace("_", "-") if field else "settings")
    return f"{option}: {str(err.get('msg', 'invalid value')).removeprefix('Value error, ')}"


def _exit(code: int, message: str) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


class _ProgressBar:
    """A tqdm bar over the optimizer steps: loss, lr and samples/s in its postfix, ETA from tqdm."""

    def __init__(self, start: int, total: int):
        self.start, self.total = start, total

    def __enter__(self) -> _ProgressBar:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=self.start, desc="finetune", unit="step", dynamic_ncols=True)
        return self

    def update(self, progress: Any) -> None:
        self.bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2e}",
                             samples_s=f"{progress.samples_per_s:.2f}", refresh=False)
        self.bar.update(progress.step - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
