"""Result images downloaded from the gateway into a local folder, where Gradio can serve them.

``<cache_dir>/results/<job_id>/<n>.png``: the PNG the gateway stores (with the generation parameters in its
text chunks). A job's folder is removed once it is older than ``ttl_s``; pruning runs at most once a minute,
on the next download.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from frontend_gradio.client import GatewayClient

CACHE_TTL_S = 24 * 3600  # downloaded results (and Gradio's copies of them) are kept a day
PRUNE_EVERY_S = 60


class ResultCache:
    """Downloads a job's result images once and hands out their local paths."""

    def __init__(self, client: GatewayClient, cache_dir: Path, ttl_s: float = CACHE_TTL_S) -> None:
        self.client = client
        self.folder = Path(cache_dir) / "results"
        self.ttl_s = ttl_s
        self._last_prune = 0.0

    def prune(self) -> None:
        """Drop downloaded results older than the TTL (at most once every ``PRUNE_EVERY_S``)."""
        now = time.time()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        for folder in self.folder.glob("*"):
            try:
                if now - folder.stat().st_mtime > self.ttl_s:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass

    def download(self, job: dict[str, Any], key: str | None) -> list[Path]:
        """Local PNG paths of the job's result images, in the job's order (fetched with ``key`` if new)."""
        self.prune()
        folder = self.folder / job["id"]
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in (job.get("result") or {}).get("images") or []:
            index = int(item.get("index", len(paths))) if isinstance(item, dict) else len(paths)
            path = folder / f"{index}.png"
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(self.client.image_bytes(job["id"], index, key=key, fmt="png"))
                tmp.replace(path)
            paths.append(path)
        return paths
