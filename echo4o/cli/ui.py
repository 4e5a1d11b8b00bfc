"""``echo4o ui``: the Gradio demo, a client of a running gateway."""

from __future__ import annotations

import typer

from echo4o.cli import app
from echo4o.settings import get_settings


@app.command()
def ui(
    api: str | None = typer.Option(None, "--api", help="Gateway base URL (default: ECHO4O_UI_API_URL)."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Key used for sessions that enter none (default: ECHO4O_UI_API_KEY).",
        show_default=False,
    ),
    host: str | None = typer.Option(None, "--host", help="Address to bind (default: ECHO4O_UI_HOST)."),
    port: int | None = typer.Option(None, "--port", help="Port to bind (default: ECHO4O_UI_PORT, 7860)."),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="Jobs followed at once (default: ECHO4O_UI_CONCURRENCY)."
    ),
) -> None:
    """Serve the demo UI (text-to-image, multi-reference, history, admin) against a gateway."""
    from echo4o.logging import setup_logging

    s = get_settings()
    setup_logging(s.log_level, s.log_format)
    key = api_key if api_key is not None else (s.ui_api_key.get_secret_value() if s.ui_api_key else None)
    url = api or s.ui_api_url
    if not url.startswith(("http://", "https://")):
        typer.echo(f"error: --api must be an http(s) URL, got {url!r} (e.g. http://127.0.0.1:8000)", err=True)
        raise typer.Exit(2)

    from frontend_gradio.app import launch  # gradio is slow to import: only here

    launch(url, key or None, host=host or s.ui_host, port=port or s.ui_port,
           concurrency=concurrency or s.ui_concurrency, max_queue=s.ui_max_queue)
