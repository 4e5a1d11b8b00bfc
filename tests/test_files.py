"""Atomic writes: the target is replaced whole, and a write that fails leaves the old file and no temp file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from echo4o.files import write_atomic


def test_a_write_makes_the_folder_and_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "0.png"
    assert write_atomic(target, b"first") == target
    write_atomic(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["0.png"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_atomic(tmp_path / "0.png", b"old")
    seen: list[str] = []

    def failing_replace(src: str, dst: object) -> None:
        seen.append(Path(src).name)
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert seen and seen[0].startswith(".0.png.") and seen[0].endswith(".tmp")  # what the worker cleans up after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png"]
