"""Loading a checkpoint in the released layout: find it (local folder or Hugging Face Hub), build the model
without allocating weights, stream every tensor from safetensors straight to its device and dtype, with strict
key checking; optionally place the model across several devices with accelerate (small cards).

Errors are :class:`CheckpointError` and name the file at fault and how to fix it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from echo4o.logging import get_logger
from worker.engine.config import (
    AE_CONFIG,
    AE_WEIGHTS,
    EMA_WEIGHTS,
    LLM_CONFIG,
    VIT_CONFIG,
    BagelConfig,
    ConfigError,
)
from worker.engine.models.bagel import Bagel
from worker.engine.models.qwen2_mot import MoTDecoderLayer, Qwen2RotaryEmbedding
from worker.engine.models.siglip_navit import SiglipEncoderLayer
from worker.engine.models.vae import FluxVAE, flux_to_diffusers_key, flux_to_diffusers_tensor

log = get_logger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
REQUIRED_FILES = (LLM_CONFIG, VIT_CONFIG, EMA_WEIGHTS, AE_WEIGHTS, *TOKENIZER_FILES)
# exactly what is fetched from the Hub: the released layout, nothing else that a repository may hold
HUB_FILES = (*REQUIRED_FILES, AE_CONFIG, "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
             "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be found, read or matched to the model; the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# where the checkpoint is
# ---------------------------------------------------------------------------------------------------


def resolve_checkpoint(source: str | os.PathLike, *, token: str | None = None, cache_dir: str | None = None,
                       endpoint: str | None = None) -> Path:
    """A local folder holding the released layout: ``source`` itself, or a Hub snapshot downloaded (with a
    progress bar) into the Hugging Face cache."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or not _HUB_ID.match(text):
        if not path.is_dir():
            raise CheckpointError(
                f"model folder {path} does not exist. Pass a folder in the released layout "
                f"({', '.join(REQUIRED_FILES)}), a Hugging Face Hub id such as Yejy53/Echo-4o, or create a tiny "
                f"test model with `echo4o make-tiny {path}`."
            )
        check_layout(path)
        return path
    return _download(text, token=token, cache_dir=cache_dir, endpoint=endpoint)


def check_layout(path: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}. A model folder needs the released layout "
            f"({', '.join(REQUIRED_FILES)}); download the whole repository again "
            f"(huggingface-cli download Yejy53/Echo-4o --local-dir {path}) or run `echo4o make-tiny {path}`."
        )


def _download(repo_id: str, *, token: str | None, cache_dir: str | None, endpoint: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    log.info("fetching model from the Hugging Face Hub", extra={"repo_id": repo_id})
    try:
        local = snapshot_download(repo_id, allow_patterns=list(HUB_FILES), token=token, cache_dir=cache_dir,
                                  endpoint=endpoint)
    except GatedRepoError as exc:
        raise CheckpointError(f"Hub repository {repo_id} is gated: accept its terms on huggingface.co and set "
                              f"ECHO4O_HF_TOKEN (or HF_TOKEN) to a token with access ({exc})") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"Hub repository {repo_id} does not exist or is private: check the id, or set "
                              f"ECHO4O_HF_TOKEN for a private one ({type(exc).__name__})") from exc
    except Exception as exc:  # noqa: BLE001 - network, offline mode, disk: all end in the same advice
        raise CheckpointError(
            f"cannot fetch {repo_id} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Check the network (or HF_ENDPOINT / proxy settings), or download it elsewhere "
            f"(huggingface-cli download {repo_id} --local-dir DIR) and pass that folder instead."
        ) from exc
    path = Path(local)
    check_layout(path)
    return path


# ---------------------------------------------------------------------------------------------------
# streaming safetensors into a module
# ---------------------------------------------------------------------------------------------------


def _open_safetensors(path: Path, device: torch.device | None = None):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device=str(device or "cpu"))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: a broken or truncated file
        raise CheckpointError(
            f"{path.name} in {path.parent} is not a readable safetensors file ({type(exc).__name__}: "
            f"{str(exc)[:200]}). It is probably truncated or corrupt: download it again."
        ) from exc


def _first(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_safetensors(
    module: nn.Module,
    path: Path,
    *,
    device_of: Callable[[str], torch.device],
    dtype: torch.dtype,
    rename: Callable[[str], str] = lambda k: k,
    convert: Callable[[str, torch.Tensor], torch.Tensor] = lambda k, t: t,
    read_device: torch.device | None = None,
) -> list[str]:
    """Load ``path`` into ``module`` (built on the meta device) strictly, one tensor at a time, each sent
    straight to ``device_of(name)`` in ``dtype`` (floating tensors only). Returns the names loaded.

    ``read_device``: where safetensors materialises each tensor (the target device when all weights go to one,
    so nothing passes through host memory but the file's pages)."""
    expected = module.state_dict()
    with _open_safetensors(path, read_device) as f:
        file_keys = list(f.keys())
        mapped = {rename(k): k for k in file_keys}
        missing = set(expected) - set(mapped)
        unexpected = set(mapped) - set(expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (first: {_first(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (first: {_first(mapped[k] for k in unexpected)})")
            raise CheckpointError(
                f"{path.name} in {path.parent} does not match the model built from its configs: "
                f"{'; '.join(parts)}. Use the checkpoint and config files of one release together "
                f"(download the folder again if a file was replaced)."
            )
        state = {}
        for name, key in mapped.items():
            try:
                tensor = convert(name, f.get_tensor(key))
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{path.name}: tensor {key!r} cannot be read ({exc}); download the file "
                                      f"again") from exc
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{path.name}: tensor {key!r} has shape {tuple(tensor.shape)} but the model built from the "
                    f"configs expects {tuple(expected[name].shape)}; the config files and weights belong to "
                    f"different models."
                )
            target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
            state[name] = tensor.to(device=device_of(name), dtype=target_dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return list(state)


# ---------------------------------------------------------------------------------------------------
# the model and the VAE
# ---------------------------------------------------------------------------------------------------


def load_bagel(path: Path, config: BagelConfig, device: torch.device, dtype: torch.dtype,
               device_map: dict[str, str | int | torch.device] | None = None) -> Bagel:
    """Build the Bagel model without memory and fill it from ``ema.safetensors``."""
    with torch.device("meta"):
        model = Bagel(config)
    device_of = _device_lookup(device_map, device)
    load_safetensors(model, path / EMA_WEIGHTS, device_of=device_of, dtype=dtype,
                     read_device=None if device_map else device)
    # buffers that are not in the checkpoint are made on the device of their module
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=config.llm).to(
        device_of("language_model.model.rotary_emb.inv_freq"))
    model.eval().requires_grad_(False)
    if device_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map, main_device=str(device))
    return model


def load_vae(path: Path, config: BagelConfig, device: torch.device, dtype: torch.dtype) -> FluxVAE:
    """Build the FLUX VAE without memory and fill it from ``ae.safetensors`` (FLUX key names)."""
    with torch.device("meta"):
        vae = FluxVAE(config.vae)
    n = vae.num_levels
    load_safetensors(
        vae,
        path / AE_WEIGHTS,
        device_of=lambda _name: device,
        dtype=dtype,
        read_device=device,
        rename=lambda k: "autoencoder." + flux_to_diffusers_key(k, n),
        convert=lambda k, t: flux_to_diffusers_tensor(flux_to_diffusers_key(k, n), t),
    )
    return vae.eval().requires_grad_(False)


def read_config(path: Path) -> BagelConfig:
    try:
        return BagelConfig.from_dir(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def _device_lookup(device_map: dict | None, default: torch.device) -> Callable[[str], torch.device]:
    if not device_map:
        return lambda _name: default

    def lookup(name: str) -> torch.device:
        best, target = -1, default
        for prefix, dev in device_map.items():
            if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, target = len(prefix), dev
        if target == "disk":
            raise CheckpointError("disk offload is not supported; give the model more GPU or CPU memory")
        return torch.device(f"cuda:{target}" if isinstance(target, int) else target)

    return lookup


def auto_device_map(config: BagelConfig, dtype: torch.dtype,
                    max_memory: dict[int | str, int | str] | None = None) -> dict[str, str | int]:
    """An accelerate device map over the visible GPUs (then the CPU) for cards too small for the whole model.

    Decoder layers and ViT layers are never split; the embeddings, heads and encoders stay on the first GPU.
    """
    from accelerate import infer_auto_device_map

    with torch.device("meta"):
        model = Bagel(config)
    keep_first = ["language_model.model.embed_tokens", "language_model.model.norm",
                  "language_model.model.norm_moe_gen", "language_model.model.rotary_emb", "language_model.lm_head",
                  "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed", "vit_model", "connector",
                  "vit_pos_embed"]
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, dtype=dtype,
        no_split_module_classes=[MoTDecoderLayer.__name__, SiglipEncoderLayer.__name__],
    )
    first = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    for name in keep_first:
        for key in list(device_map):
            if key == name or key.startswith(name + "."):
                device_map[key] = first
    return device_map
