"""``echo4o version`` and ``echo4o config``."""

from __future__ import annotations

import json
import platform
from typing import Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from echo4o import __version__
from echo4o.cli import app
from echo4o.settings import Settings, get_settings


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
    reference: bool = typer.Option(False, "--reference", help="Print every setting with its default, accepted "
                                   "values and meaning, as a Markdown table (the one in docs/configuration.md)."),
) -> None:
    """Print the effective settings (from ECHO4O_* variables and .env) with secrets masked."""
    if reference:
        typer.echo(reference_table())
        return
    values = get_settings().masked()
    if as_json:
        typer.echo(json.dumps(values, indent=2, default=str))
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        typer.echo(f"{('ECHO4O_' + key.upper()).ljust(width + 7)}  {value}")


def reference_table() -> str:
    """Every field of :class:`~echo4o.settings.Settings` as a Markdown table row: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            default = str(default).lower()  # as the variable is written
        shown = "" if default in (None, "", []) else f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|").replace("<", "\\<")
        accepted = _accepted(field)
        rows.append(f"| `ECHO4O_{name.upper()}` | {shown} | {meaning}{' ' + accepted if accepted else ''} |")
    return "\n".join(rows)


def _accepted(field: FieldInfo) -> str:
    """The values a field takes, where its type or bounds say more than its description: ``(one of ...)``,
    ``(1-65535)``, ``(>= 0)``, ``(> 0, <= 60)``."""
    if get_origin(field.annotation) is Literal:
        return "(one of " + ", ".join(f"`{v}`" for v in get_args(field.annotation)) + ")"
    bounds = {op: getattr(rule, attr) for rule in field.metadata
              for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if getattr(rule, attr, None) is not None}
    if ">=" in bounds and "<=" in bounds:
        return f"({bounds['>=']}-{bounds['<=']})"
    return f"({', '.join(f'{op} {value}' for op, value in bounds.items())})" if bounds else ""
