"""``echo4o make-tiny``, ``echo4o generate`` and ``echo4o download``: the engine from the command line.

Heavy imports (torch, the engine, huggingface_hub) happen inside the command functions, so ``echo4o --help``
stays fast. Defaults for model, device, dtype and attention come from :func:`echo4o.settings.get_settings`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from echo4o.cli import app
from echo4o.logging import get_logger
from echo4o.settings import get_settings

log = get_logger(__name__)

# Hub ids whose local folder name is fixed by model_weights/README.md; others use the repo name, lowercased.
KNOWN_NAMES = {"yejy53/echo-4o": "echo4o", "bytedance-seed/bagel-7b-mot": "bagel-7b-mot"}
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "flash_attn")


def _fail(message: str, code: int = 2) -> None:
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


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw (with --ref: the instruction)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output PNG (several images: OUT-0.png, OUT-1.png, ...)."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Model folder or Hub id. Default: ECHO4O_MODEL."),
    ref: list[Path] = typer.Option([], "--ref", help="Reference image (repeat for several, in order)."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=2**32 - 1, help="Seed. Default: drawn and printed."),
    steps: int = typer.Option(50, "--steps", min=2, max=1000, help="Schedule points (steps - 1 denoising steps)."),
    height: int | None = typer.Option(None, "--height", help="Multiple of 16, at most 1024 (with --width)."),
    width: int | None = typer.Option(None, "--width", help="Multiple of 16, at most 1024 (with --height)."),
    aspect: str | None = typer.Option(None, "--aspect", help="Size preset: 1:1, 4:3, 3:4, 16:9 or 9:16."),
    cfg_text_scale: float = typer.Option(4.0, "--cfg-text-scale", help="Text guidance scale."),
    cfg_img_scale: float | None = typer.Option(None, "--cfg-img-scale",
                                               help="Image guidance scale. Default: 1.0, or 2.0 with --ref."),
    cfg_interval: tuple[float, float] | None = typer.Option(
        None, "--cfg-interval", help="Guidance applies for t in (LOW, HIGH]. Default: 0.4 1.0, or 0 1 with --ref."),
    timestep_shift: float = typer.Option(3.0, "--timestep-shift", help="Schedule shift s."),
    cfg_renorm_type: str | None = typer.Option(
        None, "--cfg-renorm-type", help="global, channel or text_channel. Default: global, text_channel with --ref."),
    cfg_renorm_min: float = typer.Option(0.0, "--cfg-renorm-min", help="Floor of the renorm factor."),
    num_images: int = typer.Option(1, "--num-images", "-n", min=1, max=16, help="Images to generate."),
    attention: str | None = typer.Option(None, "--attention", help="auto, sdpa, xformers or flash_attn. "
                                                                   "Default: ECHO4O_ATTENTION."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N. Default: ECHO4O_DEVICE."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16. "
                                                           "Default: ECHO4O_DTYPE."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate an image from a prompt (and reference images); the PNG carries every parameter."""
    settings = get_settings()
    from echo4o.jobs import ASPECT_PRESETS, MAX_SIDE, SIDE_MULTIPLE, draw_seed

    if aspect is not None:
        if aspect not in ASPECT_PRESETS:
            _fail(f"--aspect must be one of {', '.join(ASPECT_PRESETS)}; got {aspect!r}")
        if height is not None or width is not None:
            _fail("give either --aspect or --height/--width, not both")
        height, width = ASPECT_PRESETS[aspect]
    if (height is None) != (width is None):
        _fail("--height and --width go together (or use --aspect)")
    for flag, value in (("--height", height), ("--width", width)):
        # checked before the (slow) model load; the pipeline checks again against the model's own limits
        if value is not None and not (SIDE_MULTIPLE <= value <= MAX_SIDE and value % SIDE_MULTIPLE == 0):
            _fail(f"{flag} must be a multiple of {SIDE_MULTIPLE} in {SIDE_MULTIPLE}..{MAX_SIDE}; got {value}")
    attention = attention or settings.attention
    if attention not in ATTENTION_CHOICES:
        _fail(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}; got {attention!r}")
    if out.suffix.lower() != ".png":
        _fail(f"--out must be a .png file (the parameters live in its text chunks); got {out}")
    from PIL import Image, UnidentifiedImageError

    references = []
    for i, path in enumerate(ref):
        try:
            with Image.open(path) as img:
                img.load()
                references.append(img.copy())
        except FileNotFoundError:
            _fail(f"--ref #{i + 1}: {path} does not exist")
        except (UnidentifiedImageError, OSError) as exc:
            _fail(f"--ref #{i + 1}: {path} is not a readable image ({exc})")
    seed = draw_seed() if seed is None else seed

    from tqdm import tqdm

    from echo4o.pnginfo import write_png
    from worker.engine import pipeline as engine_pipeline

    model = model or settings.model
    try:
        pipe = engine_pipeline.Echo4oPipeline.from_pretrained(
            model,
            device=device or settings.device,
            dtype=dtype or settings.dtype,
            attention=attention,
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
            bar = tqdm(total=total * num_images, desc="denoising", unit="step", file=sys.stderr, leave=True)
        bar.update(1)

    try:
        result = pipe(
            prompt,
            images=references or None,
            height=height,
            width=width,
            num_steps=steps,
            cfg_text_scale=cfg_text_scale,
            cfg_img_scale=cfg_img_scale,
            cfg_interval=cfg_interval,
            timestep_shift=timestep_shift,
            cfg_renorm_type=cfg_renorm_type,
            cfg_renorm_min=cfg_renorm_min,
            seed=seed,
            num_images=num_images,
            callback=on_step,
        )
    except ValueError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("\ncancelled", err=True)
        raise typer.Exit(130) from None
    finally:
        if bar is not None:
            bar.close()

    params = dict(result.params)
    if ref:
        params["references"] = [p.name for p in ref]
    outputs = [out] if num_images == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num_images)]
    for i, (image, path) in enumerate(zip(result.images, outputs, strict=True)):
        write_png(image, path, {**params, "image_index": i} if num_images > 1 else params)
        typer.echo(f"wrote {path}")
    timings = result.timings
    typer.echo(
        f"seed {params['seed']}, {params['width']}x{params['height']}, {steps - 1} steps, "
        f"attention {params.get('attention')}, {timings.get('step_s', 0):.3f}s/step, "
        f"{timings.get('total_s', 0):.1f}s total"
    )


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

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token)
    except RepositoryNotFoundError:
        _fail(f"{repo_id} is not on the Hugging Face Hub, or it is private: check the id, or set ECHO4O_HF_TOKEN",
              code=1)
    except Exception as exc:  # noqa: BLE001 - the HTTP client's connection errors have no common base here
        _fail(f"cannot reach the Hugging Face Hub for {repo_id} ({type(exc).__name__}: {_first_line(exc)}). "
              "Check the network (or HF_ENDPOINT / proxy settings), or copy the weights by hand into "
              f"{target} and point ECHO4O_MODEL at it", code=1)
    commit = info.sha or revision
    typer.echo(f"downloading {repo_id}@{commit} into {target}")
    try:
        snapshot_download(repo_id, revision=commit, local_dir=target, token=token)
    except Exception as exc:  # noqa: BLE001 - as above
        _fail(f"download of {repo_id} failed ({type(exc).__name__}: {_first_line(exc)}); run the same command "
              "again to resume", code=1)
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
