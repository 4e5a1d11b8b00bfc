"""``echo4o make-tiny``, ``echo4o generate`` and ``echo4o download``: the engine from the command line.

Heavy imports (torch, the engine, huggingface_hub) happen inside the command functions, so ``echo4o --help``
stays fast. ``generate`` turns its options into the job model of :mod:`echo4o.jobs` (the one the gateway queues)
and loads through ``Echo4oPipeline.from_pretrained``; model, device, dtype and attention come from the options,
else from a ``--from`` PNG, else from :func:`echo4o.settings.get_settings`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import typer

from echo4o.cli import app
from echo4o.logging import get_logger
from echo4o.settings import get_settings

log = get_logger(__name__)

# Hub ids whose local folder name is fixed by model_weights/README.md; others use the repo name, lowercased.
KNOWN_NAMES = {"yejy53/echo-4o": "echo4o", "bytedance-seed/bagel-7b-mot": "bagel-7b-mot"}
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "flash_attn")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------ make-tiny


@app.command("make-tiny")
def make_tiny(
    out_dir: Path = typer.Argument(..., help="Folder to write the tiny model into (created; should be empty)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the random weights (same seed, same files)."),
) -> None:
    """Write a random-weight tiny Echo-4o (same architecture and layout, a few MB) for trying the stack."""
    from worker.engine.tiny import write_tiny_model

    t0 = time.perf_counter()
    path = Path(write_tiny_model(out_dir, seed=seed))
    if not (path / "manifest.json").exists():
        write_manifest(path, name=path.parent.name or "tiny", version=path.name, source="make-tiny", hash_files=True)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    typer.echo(f"wrote {path} ({size / 1e6:.1f} MB, seed {seed}) in {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------ generate

#: generate's options and the job field each sets (the field names are those of echo4o.jobs and of the PNG).
_FLAG_OF_FIELD = {
    "prompt": "--prompt", "seed": "--seed", "num_steps": "--steps", "height": "--height", "width": "--width",
    "aspect_ratio": "--aspect", "cfg_text_scale": "--cfg-text-scale", "cfg_img_scale": "--cfg-img-scale",
    "cfg_interval": "--cfg-interval", "timestep_shift": "--timestep-shift", "cfg_renorm_type": "--cfg-renorm-type",
    "cfg_renorm_min": "--cfg-renorm-min", "num_images": "--num-images", "references": "--ref",
}
#: Loading options a PNG records (the pipeline's params) and generate's flags for them.
_LOAD_FIELDS = ("model", "device", "dtype", "attention")


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", "-o", help="Output PNG (several images: OUT-0.png, OUT-1.png, ...)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p",
                                      help="What to draw (with --ref: the instruction). Required unless --from."),
    from_png: Path | None = typer.Option(
        None, "--from", help="Re-run the parameters embedded in a PNG written by echo4o (prompt, seed, size, "
                             "guidance, references, model, device, dtype, attention); the other options given "
                             "override them. Same model and device: the same image, byte for byte."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Model folder or Hub id. Default: ECHO4O_MODEL."),
    ref: list[Path] = typer.Option([], "--ref", help="Reference image (repeat for several, in order)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed. Default: drawn and printed."),
    steps: int | None = typer.Option(None, "--steps", help="Schedule points (steps - 1 denoising steps). Default: 50."),
    height: int | None = typer.Option(None, "--height", help="Output height in pixels (with --width)."),
    width: int | None = typer.Option(None, "--width", help="Output width in pixels (with --height)."),
    aspect: str | None = typer.Option(None, "--aspect", help="Size preset instead of --height/--width, e.g. 16:9."),
    cfg_text_scale: float | None = typer.Option(None, "--cfg-text-scale", help="Text guidance scale. Default: 4.0."),
    cfg_img_scale: float | None = typer.Option(None, "--cfg-img-scale",
                                               help="Image guidance scale. Default: 1.0, or 2.0 with --ref."),
    cfg_interval: tuple[float, float] | None = typer.Option(
        None, "--cfg-interval", help="Guidance applies for t in (LOW, HIGH]. Default: 0.4 1.0, or 0 1 with --ref."),
    timestep_shift: float | None = typer.Option(None, "--timestep-shift", help="Schedule shift s. Default: 3.0."),
    cfg_renorm_type: str | None = typer.Option(
        None, "--cfg-renorm-type", help="global, channel or text_channel. Default: global, text_channel with --ref."),
    cfg_renorm_min: float | None = typer.Option(None, "--cfg-renorm-min",
                                                help="Floor of the renorm factor. Default: 0."),
    num_images: int | None = typer.Option(None, "--num-images", "-n",
                                          help="Images to draw from the seed, one after another. Default: 1."),
    attention: str | None = typer.Option(None, "--attention", help="auto, sdpa, xformers or flash_attn. "
                                                                   "Default: ECHO4O_ATTENTION."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N. Default: ECHO4O_DEVICE."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16. "
                                                           "Default: ECHO4O_DTYPE."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate an image from a prompt (and reference images); the PNG's text chunks carry every parameter.

    The options become the same job (echo4o.jobs) the gateway queues, validated by the same rules."""
    settings = get_settings()
    if out.suffix.lower() != ".png":
        _fail(f"--out must be a .png file (the parameters live in its text chunks); got {out}")
    embedded = _read_from_png(from_png) if from_png is not None else {}

    given = {"prompt": prompt, "seed": seed, "num_steps": steps, "height": height, "width": width,
             "aspect_ratio": aspect, "cfg_text_scale": cfg_text_scale, "cfg_img_scale": cfg_img_scale,
             "cfg_interval": cfg_interval, "timestep_shift": timestep_shift, "cfg_renorm_type": cfg_renorm_type,
             "cfg_renorm_min": cfg_renorm_min, "num_images": num_images}
    given = {k: v for k, v in given.items() if v is not None}
    base = {k: v for k, v in embedded.items() if k in _FLAG_OF_FIELD and k != "references"}
    if {"height", "width", "aspect_ratio"} & set(given):  # a size on the command line replaces the embedded one
        base = {k: v for k, v in base.items() if k not in ("height", "width", "aspect_ratio")}
    if "prompt" not in base and "prompt" not in given:
        _fail("--prompt is required (or --from a PNG that carries one)")

    references = [p.expanduser().resolve() for p in ref] if ref else _embedded_references(embedded, from_png)
    job, data_dir = _build_job({**base, **given}, references)
    try:
        kwargs = job.to_pipeline_kwargs(data_dir) if references else job.to_pipeline_kwargs()
    except ValueError as exc:  # a reference that cannot be opened, named as references.<i>
        _fail(f"--ref: {exc}")
    loading = _loading_options(model=model, device=device, dtype=dtype, attention=attention, embedded=embedded)

    from tqdm import tqdm

    from echo4o.pnginfo import write_png
    from worker.engine import pipeline as engine_pipeline

    try:
        pipe = engine_pipeline.Echo4oPipeline.from_pretrained(
            loading["model"], device=loading["device"], dtype=loading["dtype"], attention=loading["attention"],
            token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except engine_pipeline.CheckpointError as exc:
        _fail(str(exc), code=1)

    bar: Any = None

    def on_step(step: int, total: int, preview: Any) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=total * job.num_images, desc="denoising", unit="step", file=sys.stderr, leave=True)
        bar.update(1)

    try:
        result = pipe(**kwargs, callback=on_step)
    except ValueError as exc:  # a limit of this model (e.g. a smaller largest size than the job allows)
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("\ncancelled", err=True)
        raise typer.Exit(130) from None
    finally:
        if bar is not None:
            bar.close()

    params = dict(result.params)
    if references:  # relative to the output's folder, where `--from` looks for them first
        params["references"] = [_relative_to(path, out.expanduser().resolve().parent) for path in references]
    n = job.num_images
    outputs = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    for i, (image, path) in enumerate(zip(result.images, outputs, strict=True)):
        write_png(image, path, {**params, "image_index": i} if n > 1 else params)
        typer.echo(f"wrote {path}")
    timings = result.timings
    typer.echo(
        f"seed {params['seed']}, {params['width']}x{params['height']}, {job.num_steps - 1} steps, "
        f"attention {params.get('attention')}, {timings.get('step_s', 0):.3f}s/step, "
        f"{timings.get('total_s', 0):.1f}s total"
    )


def _read_from_png(path: Path) -> dict[str, Any]:
    """The parameters embedded in ``path`` (see echo4o.pnginfo); exit 2 naming the file when it has none."""
    from echo4o.pnginfo import params_from_png

    try:
        return params_from_png(path)
    except ValueError as exc:
        _fail(f"--from: {exc}. Give a PNG written by `echo4o generate` or a worker")


def _embedded_references(embedded: dict[str, Any], png: Path | None) -> list[Path]:
    """References recorded in a PNG: relative to its folder (as `echo4o generate` records them), else to
    ECHO4O_DATA_DIR (as the gateway stores uploads); absolute ones as they are."""
    names = embedded.get("references") or []
    if png is None or not names:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        _fail(f"--from: {png} records references as {names!r}, not a list of file names")
    folder, data_dir = png.expanduser().resolve().parent, get_settings().data_dir
    paths = []
    for name in names:
        beside = (folder / name).resolve()
        paths.append(beside if beside.exists() or Path(name).is_absolute() else (data_dir / name).resolve())
    return paths


def _relative_to(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` (with ``..`` where needed), as a POSIX string; absolute across drives."""
    import os

    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # Windows: another drive
        return path.as_posix()


def _build_job(params: dict[str, Any], references: list[Path]) -> tuple[Any, Path | None]:
    """The GenerateJob (no references) or MultirefJob for ``params``, validated by echo4o.jobs; for a MultirefJob
    also the data dir its relative references live in (their common folder). Exit 2, one line per field, when
    the job model refuses them."""
    from pydantic import ValidationError

    from echo4o.jobs import GenerateJob, MultirefJob

    data_dir = None
    if references:
        import os

        data_dir = Path(os.path.commonpath([p.parent for p in references]))
        params = {**params, "references": [p.relative_to(data_dir).as_posix() for p in references]}
    try:
        job = (MultirefJob if references else GenerateJob).model_validate(params)
    except ValidationError as exc:
        typer.echo("\n".join(_validation_lines(exc)), err=True)
        raise typer.Exit(2) from None
    return job, data_dir


def _validation_lines(exc: Any) -> list[str]:
    """``error: <field> (<flag>): <problem>``, one line per problem, worded by echo4o.jobs."""
    from types import SimpleNamespace

    from echo4o.jobs import describe_validation_error

    lines = []
    for e in exc.errors():
        flag = _FLAG_OF_FIELD.get(str(e["loc"][0])) if e.get("loc") else None
        text = describe_validation_error(SimpleNamespace(errors=lambda e=e: [e]))
        lines.append(f"error: {flag}: {text}" if flag else f"error: {text}")
    return lines


def _loading_options(*, model: str | None, device: str | None, dtype: str | None, attention: str | None,
                     embedded: dict[str, Any]) -> dict[str, str]:
    """model, device, dtype and attention: the option, else the value a ``--from`` PNG records, else the setting.
    Checked by the settings' own rules (exit 2 naming the option), so a bad one fails before the model loads."""
    from pydantic import ValidationError

    from echo4o.settings import Settings

    given = {"model": model, "device": device, "dtype": dtype, "attention": attention}
    chosen = {k: v for k, v in given.items() if v is not None}
    for key in _LOAD_FIELDS:
        if key not in chosen and isinstance(embedded.get(key), str):
            chosen[key] = embedded[key]
    try:
        settings = Settings(**chosen)
    except ValidationError as exc:
        for e in exc.errors():
            field = str(e["loc"][0]) if e.get("loc") else "settings"
            source = f"--{field}" if given.get(field) is not None else f"{field} recorded in the --from PNG"
            msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            typer.echo(f"error: {source}: {msg} (got {e.get('input')!r})", err=True)
        raise typer.Exit(2) from None
    return {k: getattr(settings, k) for k in _LOAD_FIELDS}


# ------------------------------------------------------------------------------------------------ download


@app.command()
def download(
    repo_id: str = typer.Argument(None, help="Hub id. Default: ECHO4O_MODEL (Yejy53/Echo-4o)."),
    weights_dir: Path | None = typer.Option(None, "--dir", help="Weights root. Default: ECHO4O_WEIGHTS_DIR."),
    revision: str = typer.Option("main", "--revision", help="Branch, tag or commit to fetch."),
    name: str | None = typer.Option(None, "--name", help="Local model name. Default: from the repo id."),
    version: str | None = typer.Option(None, "--version", help="Local version. Default: the revision."),
) -> None:
    """Download released weights into <dir>/<name>/<version>/ with a manifest (sizes, sha256, revision)."""
    settings = get_settings()
    repo_id = repo_id or settings.model
    if Path(repo_id).expanduser().exists() or repo_id.count("/") != 1:
        _fail(f"{repo_id!r} is not a Hub id (owner/name); give one, e.g. Yejy53/Echo-4o")
    name = name or KNOWN_NAMES.get(repo_id.lower(), repo_id.split("/")[1].lower())
    version = version or revision.replace("/", "-")
    root = (weights_dir or settings.weights_dir).expanduser().resolve()
    target = root / name / version
    token = settings.hf_token.get_secret_value() if settings.hf_token else None

    from worker.engine.loading import CheckpointError, download_checkpoint

    typer.echo(f"downloading {repo_id}@{revision} into {target}")
    try:
        _path, commit = download_checkpoint(repo_id, revision=revision, local_dir=target, token=token)
    except CheckpointError as exc:
        _fail(f"{_first_line(exc)} Or copy the weights by hand into {target} and point ECHO4O_MODEL at it; "
              "running the same command again resumes a broken download.", code=1)
    manifest = write_manifest(target, name=name, version=version, source=f"hf://{repo_id}@{commit}",
                              hash_files=True)
    total = sum(f["bytes"] for f in manifest["files"].values())
    typer.echo(f"wrote {target} ({len(manifest['files'])} files, {total / 1e9:.2f} GB); "
               f"use it with ECHO4O_MODEL={target}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def write_manifest(model_dir: Path, *, name: str, version: str, source: str, parent: str | None = None,
                   hash_files: bool = True) -> dict[str, Any]:
    """Write ``model_dir/manifest.json`` (see model_weights/README.md): every file's size and sha256."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if not path.is_file() or rel == "manifest.json" or rel.startswith(".cache/") or "/." in f"/{rel}":
            continue
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if hash_files:
            entry["sha256"] = _sha256(path)
        files[rel] = entry
    manifest = {
        "name": name,
        "version": version,
        "source": source,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parent": parent,
        "files": files,
    }
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
