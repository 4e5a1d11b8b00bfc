"""The ``echo4o`` command line. Each command group lives in its own module of this package and
registers itself on :data:`app`; heavy imports (torch, the engine, FastAPI) stay inside the command
functions so that ``echo4o --help`` starts fast on any machine."""

from __future__ import annotations

import importlib
import sys

import typer
from pydantic import ValidationError

app = typer.Typer(
    name="echo4o",
    help="Serve, try out and fine-tune the Echo-4o image-generation model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that register commands on `app`, in the order they appear in --help.
COMMAND_MODULES = (
    "echo4o.cli.core",
    "echo4o.cli.engine",
    "echo4o.cli.worker",
    "echo4o.cli.serve",
    "echo4o.cli.ui",
    "echo4o.cli.bench",
    "echo4o.cli.versions",
    "echo4o.cli.finetune",
    "echo4o.cli.healthcheck",
    "echo4o.cli.doctor",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def format_settings_error(err: ValidationError) -> str:
    """One line per bad setting, naming the environment variable and what it accepts."""
    lines = []
    for e in err.errors():
        loc = "_".join(str(p) for p in e.get("loc", ()) if p != "__root__")
        var = f"ECHO4O_{loc.upper()}" if loc else "settings"
        got = e.get("input")
        got_txt = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"error: {var}: {msg}{got_txt}")
    return "\n".join(lines)


def main() -> None:
    from echo4o.logging import quiet_library_noise

    quiet_library_noise()
    try:
        app()
    except ValidationError as err:
        if err.title == "Settings":
            typer.echo(format_settings_error(err), err=True)
            sys.exit(2)
        raise
