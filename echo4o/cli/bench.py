"""``echo4o bench``: run a benchmark suite on a local model (see docs/benchmarks.md)."""

from __future__ import annotations

from echo4o.cli import app
from worker.evaluation.cli import bench

app.command("bench")(bench)
