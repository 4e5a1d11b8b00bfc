"""Loading a checkpoint in the released layout: find it (local folder or Hugging Face Hub), build the model
without allocating weights, stream every tensor from safetensors straight to its device and dtype, with strict
key checking; optionally place the model across several devices with accelerate (small cards). Also the
choices made before loading: which device and dtype (``resolve_device``, ``resolve_dtype``), whether the model
needs spreading over devices (``plan_placement``), and the tokenizer with its special-token ids
(``load_model_tokenizer``).

Errors about the files are :class:`CheckpointError` and name the file at fault and how to fix it; a bad option
(device, dtype) is a ``ValueError`` naming it.
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
from worker.engine.models.bagel import Bagel, SpecialTokens
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
# Placement across devices is used when the weights need more than this share of the card's free memory.
_FIT_FRACTION = 0.85


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
    path, _commit = download_checkpoint(repo_id, token=token, cache_dir=cache_dir, endpoint=endpoint)
    return path


def download_checkpoint(repo_id: str, *, revision: str | None = None, local_dir: str | os.PathLike | None = None,
                        token: str | None = None, cache_dir: str | None = None,
                        endpoint: str | None = None) -> tuple[Path, str]:
    """Fetch the released layout's files (``HUB_FILES``, nothing else the repository holds) of ``repo_id`` at
    ``revision`` (default: the main branch) into the Hugging Face cache, or into ``local_dir`` when given.

    Returns the folder and the commit it holds. The one Hub download path of the project: model loading and
    ``echo4o download`` both come here. Raises :class:`CheckpointError` with the fix for every failure.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    log.info("fetching model from the Hugging Face Hub", extra={"repo_id": repo_id, "revision": revision})
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, token=token)
        commit = info.sha or revision or "main"
        local = snapshot_download(repo_id, revision=commit, allow_patterns=list(HUB_FILES), token=token,
                                  cache_dir=cache_dir, local_dir=local_dir, endpoint=endpoint)
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
    return path, commit


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


def load_weights(path: Path, config: BagelConfig, device: torch.device, dtype: torch.dtype,
                 device_map: dict[str, str | int | torch.device] | None = None,
                 memory_mode: str = "full") -> tuple[Bagel, FluxVAE]:
    """The model and the VAE on ``device`` in ``memory_mode`` (:mod:`worker.engine.memory`): ``full`` streams
    every tensor straight to the device (or across ``device_map``); any other mode reads the weights into host
    memory first, then quantizes and/or offloads on the way to the device. An impossible mode is a
    ``ValueError`` naming the fix, raised before anything is read."""
    from worker.engine.memory import apply_memory_mode, check_memory_mode, expected_memory, measure_memory

    mode = check_memory_mode(memory_mode, device, device_map)
    if mode.is_full:
        return load_bagel(path, config, device, dtype, device_map=device_map), load_vae(path, config, device, dtype)
    expected = expected_memory(config, mode, dtype)
    log.info("memory mode: loading", extra={**expected.summary(), "device": str(device)})
    host = torch.device("cpu")
    model, vae = apply_memory_mode(load_bagel(path, config, host, dtype), load_vae(path, config, host, dtype),
                                   mode, device, dtype)
    measured = measure_memory(model, vae, mode)
    log.info("memory mode: loaded", extra={"memory_mode": mode.name,
                                           "weights_device_gib": round(measured.device_bytes / 2**30, 2),
                                           "weights_host_gib": round(measured.host_bytes / 2**30, 2)})
    return model, vae


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


# ---------------------------------------------------------------------------------------------------
# device, dtype, placement and tokenizer: the choices made before the weights are read
# ---------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    ``cuda`` becomes the current CUDA device with its index. A ``ValueError`` names a device that is not one of
    these, CUDA asked for where it is absent, or an index beyond the visible cards.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here: use device='cpu' "
                             f"(or install a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The weight dtype for ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16`` or
    ``float16`` (a name, with or without ``torch.``, or the torch dtype); anything else is a ``ValueError``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    return _DTYPES[name]


def plan_placement(config: BagelConfig, device: torch.device, dtype: torch.dtype,
                   memory_mode: str = "full") -> dict | None:
    """An accelerate device map (:func:`auto_device_map`) when the weights in ``dtype`` need more than 85% of
    the chosen CUDA card's free memory; ``None`` (everything on ``device``) otherwise and always on the CPU.

    With a ``memory_mode`` other than ``full`` the mode is the plan (never a device map); when its weights
    still need more than 85% of the free memory, that is logged as a warning naming a smaller mode."""
    from worker.engine.memory import expected_memory, parse_memory_mode

    if device.type != "cuda":
        return None
    mode = parse_memory_mode(memory_mode)
    need = expected_memory(config, mode, dtype).device_bytes
    free, _total = torch.cuda.mem_get_info(device)
    if need <= _FIT_FRACTION * free:
        return None
    if not mode.is_full:
        log.warning("memory mode may not fit this card: try a smaller one (nf4+offload is the smallest)",
                    extra={"memory_mode": mode.name, "need_gb": round(need / 2**30, 1),
                           "free_gb": round(free / 2**30, 1)})
        return None
    log.info("model does not fit one card: placing it with accelerate",
             extra={"need_gb": round(need / 2**30, 1), "free_gb": round(free / 2**30, 1)})
    return auto_device_map(config, dtype)


def load_model_tokenizer(path: Path, config: BagelConfig) -> tuple[object, SpecialTokens]:
    """The checkpoint's tokenizer and the ids of the four tokens that frame text and images.

    A missing or unreadable tokenizer file, a special token the tokenizer lacks, or an id outside the model's
    vocabulary is a :class:`CheckpointError` (the tokenizer files then belong to another model).
    """
    from worker.engine.tokenizer import load_tokenizer

    try:
        tokenizer, ids = load_tokenizer(path)
    except (OSError, ValueError) as exc:  # missing or unreadable tokenizer files
        raise CheckpointError(str(exc)) from exc
    special = SpecialTokens(
        bos=int(_pick(ids, "bos_token_id", "bos", "<|im_start|>")),
        eos=int(_pick(ids, "eos_token_id", "eos", "<|im_end|>")),
        start_of_image=int(_pick(ids, "start_of_image", "vision_start", "<|vision_start|>")),
        end_of_image=int(_pick(ids, "end_of_image", "vision_end", "<|vision_end|>")),
    )
    vocab = config.llm.vocab_size
    for name, value in vars(special).items():
        if not 0 <= value < vocab:
            raise CheckpointError(f"tokenizer of {path}: special token {name} has id {value}, outside the model's "
                                  f"vocabulary of {vocab}; the tokenizer files do not belong to this model")
    return tokenizer, special


def _pick(ids: dict, *names: str) -> int:
    """The first of ``names`` found in ``ids`` (the spellings tokenizer files use for one special token)."""
    for name in names:
        if name in ids:
            return ids[name]
    raise CheckpointError(f"tokenizer special ids lack {names[0]} (got {sorted(ids)})")
