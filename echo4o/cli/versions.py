"""``echo4o import``: register a checkpoint trained elsewhere as a model version; ``echo4o models list |
promote | rollback``: the registry from the command line (see :mod:`echo4o.versions`).

Heavy imports (torch, the engine) happen inside the command, so ``echo4o --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from echo4o.cli import app
from echo4o.settings import get_settings

DEFAULT_BASE = "ByteDance-Seed/BAGEL-7B-MoT"


@app.command("import")
def import_version(
    source: Path = typer.Argument(..., help="Checkpoint folder (holds ema.safetensors; configs, tokenizer and VAE "
                                            "files are taken from the base when it lacks them)."),
    name: str = typer.Option("imported", "--name", help="Model name: the version's ref is NAME/VERSION."),
    version: str | None = typer.Option(None, "--version", help="Version name. Default: the folder's name."),
    base: str = typer.Option(DEFAULT_BASE, "--base", help="What missing ViT weights and files are taken from: a "
                                                          "folder, a registered NAME/VERSION or a Hub id."),
    weights_dir: Path | None = typer.Option(None, "--dir", help="Weights root. Default: ECHO4O_WEIGHTS_DIR."),
) -> None:
    """Copy a checkpoint into <dir>/<name>/<version>/ in the released layout, with a manifest, and register it.

    The reference BAGEL trainer leaves the ViT weights (vit_model.*, vit_pos_embed.*) out of ema.safetensors: they
    are filled from the base, and the manifest records it (filled_from_base). Any other missing key is an error
    naming it (exit 2)."""
    from echo4o import versions
    from echo4o.cli.engine import write_manifest
    from echo4o.db import session_scope, upgrade_to_head

    settings = get_settings()
    source = source.expanduser().resolve()
    version = version or source.name
    try:
        ref = versions.make_ref(name, version)
    except ValueError as exc:
        _fail(f"--name/--version: {exc}")
    target = (weights_dir or settings.weights_dir).expanduser().resolve() / name / version
    if not source.is_dir():
        _fail(f"{source} is not a folder: give the checkpoint folder the trainer wrote")
    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        if versions.get_version(s, ref) is not None:
            _fail(f"model version {ref} is registered already: choose another --version")

    from worker.engine.importing import ImportCheckpointError, complete_checkpoint
    from worker.engine.loading import CheckpointError

    used_base: list[Path] = []

    def base_dir() -> Path:
        used_base.append(_resolve_base(base))
        return used_base[-1]

    try:
        result = complete_checkpoint(source, target, base_dir)
    except ImportCheckpointError as exc:
        _fail(str(exc))
    except CheckpointError as exc:
        _fail(f"--base {base}: {exc}", code=1)

    previous = _read_manifest(source)
    manifest = write_manifest(target, name=name, version=version, source=f"import:{source}",
                              parent=base if used_base else None, hash_files=True)
    manifest = {**previous, **manifest, "imported_from": str(source), "base": base if used_base else None,
                "filled_from_base": {"base": base, "groups": result.filled_groups,
                                     "keys": len(result.filled_keys)} if result.filled_keys else None,
                "files_from_base": result.files_from_base}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    try:
        with session_scope(settings.database_url) as s:
            versions.register_version(s, name=name, version=version, path=target, manifest=manifest,
                                      source="import")
    except versions.VersionConflict as exc:
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        _fail(str(exc))

    if result.files_from_base:
        typer.echo(f"took {', '.join(result.files_from_base)} from the base {base}")
    if result.filled_keys:
        typer.echo(f"filled {len(result.filled_keys)} missing keys ({', '.join(result.filled_groups)}) from the base "
                   f"{base}: the reference trainer leaves them out; recorded as filled_from_base in the manifest")
    typer.echo(f"registered {ref} ({target}); make it the default with POST /admin/models/{ref}/promote")


def _resolve_base(base: str) -> Path:
    """The base checkpoint folder: ``base`` as a folder, a registered ref, the folder ``echo4o download`` writes
    for a known Hub id, or the Hub snapshot (downloaded into the Hugging Face cache)."""
    from echo4o import versions
    from echo4o.cli.engine import KNOWN_NAMES
    from echo4o.db import session_scope
    from worker.engine.loading import resolve_checkpoint

    settings = get_settings()
    path = Path(base).expanduser()
    if path.is_dir():
        return path.resolve()
    with session_scope(settings.database_url) as s:
        row = versions.get_version(s, base)
    if row is not None:
        return Path(row.path)
    known = KNOWN_NAMES.get(base.lower())
    if known and (settings.weights_dir / known / "main").is_dir():
        return settings.weights_dir / known / "main"
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    return resolve_checkpoint(base, token=token)


def _read_manifest(folder: Path) -> dict:
    """The source's own manifest.json (a checkpoint of our trainer carries base, data, hyperparameters, ...)."""
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fail(message: str, code: int = 2):  # noqa: ANN202 - NoReturn
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------ models

models_app = typer.Typer(help="List the model versions, promote one, roll back (the database the gateway uses).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _who() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@models_app.command("list")
def models_list() -> None:
    """The configured model and every registered version (oldest first); * marks the one new jobs get."""
    from echo4o import versions
    from echo4o.db import session_scope, upgrade_to_head

    settings = get_settings()
    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        current = versions.current_version(s, settings)
        rows = [(settings.model_version, "configured", settings.model)]
        rows += [(v.ref, v.source, v.path) for v in versions.list_versions(s) if v.ref != settings.model_version]
    for ref, source, path in rows:
        typer.echo(f"{'*' if ref == current else ' '} {ref}  {source}  {path}")


@models_app.command("promote")
def models_promote(ref: str = typer.Argument(..., help="A registered version, NAME/VERSION.")) -> None:
    """Make a registered version the one new jobs get (POST /admin/models/REF/promote does the same)."""
    from echo4o import versions
    from echo4o.db import session_scope, upgrade_to_head

    settings = get_settings()
    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        previous = versions.current_version(s, settings)
        try:
            versions.promote(s, ref, by=_who())
        except versions.UnknownVersion as exc:
            _fail(f"{exc} (echo4o models list)")
    typer.echo(f"current: {ref} (was {previous})")


@models_app.command("rollback")
def models_rollback() -> None:
    """Return to the version current before the latest promotion (POST /admin/models/rollback does the same)."""
    from echo4o import versions
    from echo4o.db import session_scope, upgrade_to_head

    settings = get_settings()
    upgrade_to_head(settings.database_url)
    with session_scope(settings.database_url) as s:
        previous = versions.current_version(s, settings)
        try:
            current = versions.rollback(s, settings, by=_who())
        except versions.NothingToRollBack as exc:
            _fail(str(exc), code=1)
    typer.echo(f"current: {current} (was {previous})")
