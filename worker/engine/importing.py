"""Checkpoints trained elsewhere, made complete in the released layout (what ``echo4o import`` runs).

The reference BAGEL trainer saves ``ema.safetensors`` without the understanding encoder's weights (a known
issue of that trainer; Echo-4o's repository ships a script that copies them back from the base checkpoint) and
its checkpoint folders hold no config, tokenizer or VAE files. :func:`complete_checkpoint` writes a folder in
the released layout from such a checkpoint:

- layout files the source lacks (configs, tokenizer, ``ae.safetensors``) are taken from the base;
- the model tensors are checked against the model built from the configs: when the missing ones all belong to
  :data:`FILLABLE_GROUPS` (the ViT, ``vit_model.*``, and its fixed sin-cos position table ``vit_pos_embed.*``)
  they are copied from the base's ``ema.safetensors``; any other missing key, an unexpected key or a shape that
  differs is an :class:`ImportCheckpointError` naming it, and nothing is written.

Our own trainer (worker/training) always writes complete checkpoints, which are copied (hard-linked where the
file system allows) as they are.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.engine.config import AE_CONFIG, AE_WEIGHTS, EMA_WEIGHTS, BagelConfig
from worker.engine.loading import HUB_FILES, REQUIRED_FILES, _first, _open_safetensors, read_config

#: Key groups (name prefixes) of ema.safetensors that an import may fill from the base checkpoint.
FILLABLE_GROUPS = ("vit_model.", "vit_pos_embed.")
#: Files of the released layout other than the model weights, taken from the base when the source lacks them.
LAYOUT_FILES = tuple(dict.fromkeys(f for f in (*REQUIRED_FILES, AE_CONFIG, *HUB_FILES) if f != EMA_WEIGHTS))


class ImportCheckpointError(ValueError):
    """The checkpoint cannot be completed; the message names the key or file at fault."""


@dataclass
class ImportResult:
    """What :func:`complete_checkpoint` wrote: the keys and files it took from the base."""

    filled_keys: list[str] = field(default_factory=list)
    filled_groups: list[str] = field(default_factory=list)
    files_from_base: list[str] = field(default_factory=list)


def expected_tensors(config: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ema.safetensors must hold for ``config`` (the model built without memory)."""
    from worker.engine.models.bagel import Bagel

    with torch.device("meta"):
        model = Bagel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def complete_checkpoint(source: Path, target: Path, base: Callable[[], Path]) -> ImportResult:
    """Write ``target`` (created; must not exist) in the released layout from the checkpoint folder ``source``.

    ``base()`` returns the base checkpoint folder; it is called only when something must be taken from it.
    Raises :class:`ImportCheckpointError` naming what is wrong; ``target`` is then removed."""
    source, target = Path(source), Path(target)
    if not (source / EMA_WEIGHTS).is_file():
        raise ImportCheckpointError(f"{source} has no {EMA_WEIGHTS}: give the checkpoint folder the trainer wrote "
                                    f"(it holds {EMA_WEIGHTS})")
    if target.exists():
        raise ImportCheckpointError(f"{target} exists already: choose another --version (or --name)")
    result = ImportResult()
    base_dir: Path | None = None

    def get_base() -> Path:
        nonlocal base_dir
        if base_dir is None:
            base_dir = Path(base())
        return base_dir

    target.mkdir(parents=True)
    try:
        for name in LAYOUT_FILES:
            if (source / name).is_file():
                _link_or_copy(source / name, target / name)
            elif name in REQUIRED_FILES:
                if not (get_base() / name).is_file():
                    raise ImportCheckpointError(f"neither {source} nor the base {get_base()} has {name}")
                _link_or_copy(get_base() / name, target / name)
                result.files_from_base.append(name)
        if AE_WEIGHTS in result.files_from_base and not (source / AE_CONFIG).is_file() \
                and (get_base() / AE_CONFIG).is_file():  # the VAE's sizes come with its weights
            _link_or_copy(get_base() / AE_CONFIG, target / AE_CONFIG)
            result.files_from_base.append(AE_CONFIG)
        _complete_weights(source / EMA_WEIGHTS, target, get_base, result)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return result


def _complete_weights(ema: Path, target: Path, get_base: Callable[[], Path], result: ImportResult) -> None:
    expected = expected_tensors(read_config(target))
    with _open_safetensors(ema) as f:
        present = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    unexpected = set(present) - set(expected)
    if unexpected:
        raise ImportCheckpointError(
            f"{ema} holds {len(unexpected)} keys the model built from the configs does not have (first: "
            f"{_first(unexpected)}): the configs and weights belong to different models")
    for key, shape in present.items():
        if shape != expected[key]:
            raise ImportCheckpointError(f"{ema}: tensor {key!r} has shape {shape} but the configs expect "
                                        f"{expected[key]}: the configs and weights belong to different models")
    missing = sorted(set(expected) - set(present))
    if not missing:
        _link_or_copy(ema, target / EMA_WEIGHTS)
        return
    others = [k for k in missing if not k.startswith(FILLABLE_GROUPS)]
    if others:
        raise ImportCheckpointError(
            f"{ema} lacks {len(others)} keys that cannot be taken from the base (first: {_first(others)}); only "
            f"the groups {', '.join(g + '*' for g in FILLABLE_GROUPS)} (which the reference trainer leaves out) "
            "are filled in. Export the complete weights from the trainer")
    base_ema = get_base() / EMA_WEIGHTS
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    with _open_safetensors(base_ema) as fb:
        base_keys = set(fb.keys())
        absent = [k for k in missing if k not in base_keys]
        if absent:
            raise ImportCheckpointError(f"the base {base_ema} lacks {_first(absent)} too: name a base with "
                                        "the same architecture (--base)")
        for key in missing:
            tensor = fb.get_tensor(key)
            if tuple(tensor.shape) != expected[key]:
                raise ImportCheckpointError(f"the base {base_ema}: tensor {key!r} has shape {tuple(tensor.shape)} "
                                            f"but the configs expect {expected[key]}: name the base this checkpoint "
                                            "was trained from (--base)")
            tensors[key] = tensor
    with _open_safetensors(ema) as f:
        for key in f.keys():  # noqa: SIM118 - not a dict
            tensors[key] = f.get_tensor(key)
    save_file(tensors, str(target / EMA_WEIGHTS), metadata={"format": "pt"})
    result.filled_keys = missing
    result.filled_groups = [g.rstrip(".") for g in FILLABLE_GROUPS if any(k.startswith(g) for k in missing)]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (no second copy of a large file), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
