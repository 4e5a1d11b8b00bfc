"""Resident model versions of one worker: an LRU of loaded pipelines under a count and a memory budget.

A job names a model version (its row's ``model_version``: a registered ref ``<name>/<version>`` or the configured
version, see :mod:`echo4o.versions`). :meth:`ResidentModels.get` returns that version's pipeline, loading it
with ``Echo4oPipeline.from_pretrained`` when it is not resident. Before a load it evicts the least recently used
versions until the new one fits: at most ``max_models`` resident, and (with a byte budget) the resident
parameter bytes plus the new checkpoint's size within ``max_bytes``; after the load, the measured size counts.
The version being asked for is never evicted, so a version larger than the budget still runs (alone).

The worker runs one job at a time (Celery solo pool) and asks the cache only between jobs, so a running job
is never interrupted by a switch.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from echo4o.heap import release_frozen
from echo4o.logging import get_logger

log = get_logger(__name__)

#: Fraction of a CUDA device's memory the resident versions may take when no byte budget is set.
AUTO_CUDA_FRACTION = 0.8


def pipeline_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of ``pipeline``'s model and VAE (what it holds resident)."""
    total = 0
    seen: set[int] = set()
    for part in (getattr(pipeline, "model", None), getattr(pipeline, "vae", None)):
        if part is None:
            continue
        for tensor in (*part.parameters(), *part.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def checkpoint_bytes(path: str | Path) -> int:
    """Size of the ``*.safetensors`` files of a local checkpoint folder (0 for a Hub id or a missing folder):
    the estimate of a version's size before it is loaded."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.glob("*.safetensors") if f.is_file())


def auto_budget(device: str | None) -> int:
    """The byte budget when none is configured: :data:`AUTO_CUDA_FRACTION` of the CUDA device's memory; 0 (no
    byte limit, only the count) on the CPU."""
    if not device or not device.startswith("cuda"):
        return 0
    import torch

    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).total_memory * AUTO_CUDA_FRACTION)


class ResidentModels:
    """Loaded pipelines by version ref, least recently used first.

    ``load(path)`` loads a checkpoint folder (or Hub id); ``max_models`` >= 1 caps the count; ``max_bytes`` caps
    the resident parameter bytes (0: no byte cap).
    """

    def __init__(self, load: Callable[[str], Any], *, max_models: int, max_bytes: int = 0) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._load = load
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    @property
    def resident(self) -> list[str]:
        """Resident version refs, least recently used first."""
        return list(self._entries)

    @property
    def resident_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def add(self, ref: str, pipeline: Any) -> None:
        """Make an already loaded ``pipeline`` resident as ``ref`` (the worker's configured version at start)."""
        self._entries[ref] = (pipeline, pipeline_bytes(pipeline))
        self._entries.move_to_end(ref)
        self._evict(keep=ref, incoming=0)

    def get(self, ref: str, path: str) -> Any:
        """The pipeline of version ``ref``, loading it from ``path`` when it is not resident (evicting least
        recently used versions first, so that it fits). Load errors propagate; nothing is evicted for a load
        that fails before it starts (a folder that does not exist)."""
        if ref in self._entries:
            self._entries.move_to_end(ref)
            return self._entries[ref][0]
        if not Path(path).expanduser().exists() and Path(path).is_absolute():
            raise FileNotFoundError(f"model version {ref!r}: its folder {path} does not exist; register it again "
                                    "(echo4o import) or roll back to a version that exists")
        estimate = checkpoint_bytes(path)
        self._evict(keep=None, incoming=estimate, slots=1)
        log.info("loading model version", extra={"model_version": ref, "path": str(path),
                                                  "estimate_bytes": estimate, "resident": ",".join(self._entries)})
        pipeline = self._load(path)
        self._entries[ref] = (pipeline, pipeline_bytes(pipeline))
        self._evict(keep=ref, incoming=0)
        return pipeline

    def _evict(self, *, keep: str | None, incoming: int, slots: int = 0) -> None:
        """Drop least recently used entries (never ``keep``) until ``slots`` more fit under the count and
        ``incoming`` more bytes under the byte budget."""
        evicted = []
        for ref in list(self._entries):
            if ref == keep:
                continue
            over_count = len(self._entries) + slots > self.max_models
            over_bytes = bool(self.max_bytes) and self.resident_bytes + incoming > self.max_bytes
            if not (over_count or over_bytes):
                break
            del self._entries[ref]
            evicted.append(ref)
        if evicted:
            _free_memory()
            log.info("evicted model versions", extra={"evicted": ",".join(evicted),
                                                      "resident": ",".join(self._entries)})


def _free_memory() -> None:
    release_frozen()  # a dropped pipeline is frozen (worker.runtime freezes what it loads): let its cycles go
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
