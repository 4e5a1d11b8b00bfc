"""``echo4o healthcheck worker|url``: container health checks (docker-compose.yml) that need no curl.

* ``echo4o healthcheck worker``: exits 0 when a worker on this host (its row's hostname is this machine's, as in
  a container) has sent a heartbeat recently; ``--ready`` also asks that it has the model loaded.
* ``echo4o healthcheck url URL``: exits 0 when ``GET URL`` answers 2xx (the gateway's /healthz, the UI's page).

Anything else exits 1 with one line saying why, which Docker keeps in the container's health log.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import typer

from echo4o.cli import app

health_app = typer.Typer(help="Health checks for containers: exit 0 when healthy, 1 (with the reason) when not.",
                         no_args_is_help=True)
app.add_typer(health_app, name="healthcheck")

ALIVE = ("loading", "ready", "busy")
READY = ("ready", "busy")


@health_app.command("worker")
def worker_health(
    ready: bool = typer.Option(False, "--ready", help="Also require the model loaded (status ready or busy)."),
    max_age_s: float | None = typer.Option(
        None, "--max-age", min=1, help="Oldest heartbeat accepted, seconds (default: 6 heartbeats, at least 30)."),
    hostname: str | None = typer.Option(None, "--hostname", help="Whose worker (default: this machine's name)."),
) -> None:
    """A worker on this host sends heartbeats (read from the job database, ECHO4O_DATABASE_URL)."""
    from datetime import timedelta

    from echo4o.db import crud, session_scope
    from echo4o.settings import get_settings

    settings = get_settings()
    host = hostname or socket.gethostname()
    max_age = max_age_s or max(30.0, 6 * settings.worker_heartbeat_s)
    try:
        with session_scope(settings.database_url) as s:
            rows = [w for w in crud.list_workers(session=s) if w.hostname == host]
            newest = max(rows, key=lambda w: w.heartbeat_at, default=None)
            fresh = newest is not None and newest.heartbeat_at >= crud.utcnow() - timedelta(seconds=max_age)
            status = newest.status if newest is not None else None
    except Exception as exc:  # noqa: BLE001 - any failure to read is unhealthy, said in one line
        typer.echo(f"unhealthy: cannot read the workers table ({type(exc).__name__}): check ECHO4O_DATABASE_URL",
                   err=True)
        raise typer.Exit(1) from None
    wanted = READY if ready else ALIVE
    if newest is None:
        typer.echo(f"unhealthy: no worker of host {host!r} has registered (is `echo4o worker` running?)", err=True)
        raise typer.Exit(1)
    if not fresh or status not in wanted:
        typer.echo(f"unhealthy: worker {newest.id} is {status!r}, last heartbeat {newest.heartbeat_at:%H:%M:%S} "
                   f"(need {' or '.join(wanted)} within {max_age:g} s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: worker {newest.id} is {status}")


@health_app.command("url")
def url_health(
    url: str = typer.Argument(..., help="e.g. http://127.0.0.1:8000/healthz"),
    timeout_s: float = typer.Option(5.0, "--timeout", min=0.1, help="Seconds to wait for the answer."),
) -> None:
    """``GET url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - a URL the operator configured
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"unhealthy: GET {url} failed: {exc}", err=True)
        raise typer.Exit(1) from None
    if not 200 <= status < 300:
        typer.echo(f"unhealthy: GET {url} answered {status}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: GET {url} answered {status}")
