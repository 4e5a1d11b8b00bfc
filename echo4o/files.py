"""Atomic file writes (torch-free): a file appears whole under its name, or not at all.

Results, uploaded references, benchmark images and downloaded prompt files are all written this way: a temp file
``.<name>.<random>.tmp`` in the target's folder (so the rename stays on one filesystem), flushed to the disk, then
renamed over the target. A process killed mid-write leaves at most that temp file, never a truncated target; the
worker removes a killed attempt's temp files (:func:`remove_partial_writes`) before it writes a job's results again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: The name of a write's temp file: ``.<name>.<random>.tmp`` (``tempfile.mkstemp`` makes the random part).
_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".tmp"


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (its folder is made if missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
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


def remove_partial_writes(folder: str | Path) -> int:
    """Remove the temp files that writes killed midway left in ``folder`` (none if it does not exist); the count.
    Only for a folder whose writer is known to be gone (a job's results, rewritten by the attempt holding it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
