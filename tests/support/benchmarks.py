"""Where the public benchmark prompt files for tests are (GenEval, GenEval++, Imagine-Bench jsonl).

They are not part of this repository: the workplace keeps them in ``shared/benchmarks`` beside the checkout.
``ECHO4O_TEST_BENCHMARKS_DIR`` overrides the lookup; without it the first of ``<checkout>/../shared/benchmarks``
and ``/work/shared/benchmarks`` that exists is used. A test that needs them fails, naming the variable, when
neither exists (it never skips).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = (_REPO.parent / "shared" / "benchmarks", Path("/work/shared/benchmarks"))


def shared_benchmarks_dir() -> Path:
    """The folder holding the benchmark prompt files (see the module docstring)."""
    override = os.environ.get("ECHO4O_TEST_BENCHMARKS_DIR")
    candidates = (Path(override),) if override else _CANDIDATES
    for path in candidates:
        if (path / "geneval_plus_plus.jsonl").is_file():
            return path
    pytest.fail(f"benchmark prompt files not found in {', '.join(map(str, candidates))}: point "
                "ECHO4O_TEST_BENCHMARKS_DIR at a folder with geneval_plus_plus.jsonl, imagine_bench.jsonl and "
                "geneval_evaluation_metadata.jsonl")

