"""``echo4o version`` and ``echo4o config``."""

from __future__ import annotations

import json
import platform

import typer

from echo4o import __version__
from echo4o.cli import app
from echo4o.settings import get_settings


@app.command()
def version() -> None:
    """Print the package version, Python and (if installed) torch versions."""
    typer.echo(f"echo4o {__version__}")
    typer.echo(f"python {platform.python_version()}")
    try:  # metadata only: importing torch itself takes seconds
        from importlib.metadata import version as dist_version

        typer.echo(f"torch {dist_version('torch')}")
    except Exception:  # noqa: BLE001 - torch is optional for the gateway
        typer.echo("torch not installed")


@app.command()
def config(
    as_json: bool = typer.Option(False, "--json", help="Print as one JSON object."),
) -> None:
    """Print the effective settings (from ECHO4O_* variables and .env) with secrets masked."""
    values = get_settings().masked()
    if as_json:
        typer.echo(json.dumps(values, indent=2, default=str))
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        typer.echo(f"{('ECHO4O_' + key.upper()).ljust(width + 7)}  {value}")
