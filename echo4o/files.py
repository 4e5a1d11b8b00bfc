"""Atomic file writes (torch-free): a file appears whole under its name, or not at all.

Results, uploaded references, benchmark images and downloaded prompt files are all written this way: a temp file
``.<name>.<random>.tmp`` in the target's folder (so the rename stays on one filesystem), flushed to the disk, then
renamed over the target. A process killed mid-write leaves at most that temp file, never a truncated target; the
worker removes a killed attempt's temp files before it writes a job's results again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (its folder is made if missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
