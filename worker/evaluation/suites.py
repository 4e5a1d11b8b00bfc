"""Benchmark suites: prompt files read into typed records.

Suites
- ``geneval_pp`` (GenEval++, Echo-4o): 280 prompts, 7 tags x 40; each line ``{"tag", "include", ["exclude"],
  "prompt"}``. ``include`` lists objects (``class``, ``count`` and optionally ``color``, ``region``, ``size``), the
  checklist the judge checks. Scored per tag.
- ``imagine`` (Imagine-Bench, Echo-4o): 270 prompts ``{"id", "instruction", "note", "type"}``; ``type`` is one of
  COLOR, SHAPE, SIZE, MATERIAL, COMBINATION, TIME, ENVIRONMENT, Multi-Object and maps to a scoring category
  (:data:`IMAGINE_CATEGORIES`).
- ``geneval`` (GenEval): 553 prompts in the same layout as GenEval++ (tags single_object, two_object, counting,
  colors, position, color_attr). Scored by an object detector, not by a judge.
- ``custom``: a user's jsonl, one object a line: ``prompt`` (required), ``id`` (letters, digits, ``-``, ``_``;
  default: the line number), ``tag`` (default ``custom``), ``include``/``exclude`` (a GenEval++-style checklist),
  ``note`` (an Imagine-Bench-style explanation), ``reference_images`` (paths, relative to the jsonl file).

Record ids are the 1-based line number, zero-padded to 4 digits (the published scripts name images by line
number), or a custom record's own ``id``. A record's ``tag`` is what ``--limit`` counts within (GenEval tag,
Imagine type); its ``category`` is what scores are grouped by (the tag itself, or the Imagine category).

Pinned sources: the three public files are downloaded, when no local path is given, from the Echo-4o repository
at a fixed commit and checked against their sha256 (:data:`SOURCES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from echo4o.files import write_atomic
from echo4o.jobs import BENCHMARK_SUITES, BenchmarkSuite

SuiteName = BenchmarkSuite
SUITES: tuple[str, ...] = BENCHMARK_SUITES  # defined once, in the job contract

GENEVAL_PP_TAGS = ("color_attr", "spatial_count_attr", "color_spatial_attr", "color_count_attr",
                   "multi_object_count_attr", "size_spatial_attr", "counting")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Imagine-Bench prompt type -> scoring category, as in the published evaluation script.
IMAGINE_CATEGORIES: dict[str, str] = {
    "COLOR": "Attribute shift", "SHAPE": "Attribute shift", "SIZE": "Attribute shift",
    "MATERIAL": "Hybridization", "COMBINATION": "Hybridization",
    "TIME": "Spatiotemporal", "ENVIRONMENT": "Spatiotemporal",
    "Multi-Object": "Multi-Object",
}

ECHO4O_REPO = "yejy53/Echo-4o"
ECHO4O_REVISION = "28f36d76558e5f53b9deceda78bf025ef0d0ea24"


@dataclass(frozen=True)
class SuiteSource:
    """Where a public suite file lives, at a pinned revision, and what its bytes hash to."""

    repo: str
    revision: str
    path: str
    sha256: str
    count: int

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.revision}/{quote(self.path)}"

    @property
    def filename(self) -> str:
        return Path(self.path).name


# GenEval's metadata is the copy the Echo-4o repository carries (byte-identical to the file the paper evaluated).
SOURCES: dict[str, SuiteSource] = {
    "geneval_pp": SuiteSource(ECHO4O_REPO, ECHO4O_REVISION, "test_scripts/Geneval++.jsonl",
                              "9c1216a3f6fe2d99e4ffd63f3a6dba71f3dd7ab30a7c09cb41f03629b35d3e8f", 280),
    "imagine": SuiteSource(ECHO4O_REPO, ECHO4O_REVISION, "test_scripts/Imagine.jsonl",
                           "e22e33dd5e2722b9fedfb7ecddeb56841ec6ea93b3f0246a04d8dd374ab5a19e", 270),
    "geneval": SuiteSource(ECHO4O_REPO, ECHO4O_REVISION, "eval/gen/geneval/prompts/evaluation_metadata.jsonl",
                           "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13", 553),
}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_OBJECT_KEYS = {"class", "count", "color", "region", "size", "position"}


class SuiteFileError(ValueError):
    """A prompt file that cannot be read as its suite; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    """One benchmark prompt.

    ``include``/``exclude``: checklist objects (GenEval, GenEval++, custom); ``note``: the Imagine-Bench
    explanation of the intended fantasy; ``reference_images``: absolute paths (custom only).
    """

    id: str
    suite: str
    tag: str
    category: str
    prompt: str
    line: int
    include: tuple[dict[str, Any], ...] = ()
    exclude: tuple[dict[str, Any], ...] = ()
    note: str | None = None
    reference_images: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "suite": self.suite, "tag": self.tag, "category": self.category,
                "prompt": self.prompt, "line": self.line, "include": list(self.include),
                "exclude": list(self.exclude), "note": self.note, "reference_images": list(self.reference_images)}


@dataclass(frozen=True)
class SuiteFile:
    """The prompt file a run used: its path, sha256 and whether it is the pinned public file."""

    suite: str
    path: str
    sha256: str
    pinned_sha256: str | None

    @property
    def matches_pinned(self) -> bool | None:
        return None if self.pinned_sha256 is None else self.sha256 == self.pinned_sha256


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ loading
def load_suite(suite: str, path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
               base_url: str | None = None) -> tuple[list[PromptRecord], SuiteFile]:
    """Read ``suite`` from ``path``, or (public suites only) from ``cache_dir``, downloading the pinned file there
    first when it is absent. Returns the records, in file order, and what file they came from."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if path is None:
        if suite == "custom":
            raise ValueError("the custom suite needs a prompt file: pass the path of your jsonl")
        if cache_dir is None:
            raise ValueError(f"suite {suite!r}: give the prompt file's path, or a cache_dir to download it into")
        path = fetch_suite_file(suite, cache_dir, base_url=base_url)
    path = Path(path)
    if not path.is_file():
        raise SuiteFileError(f"{path}: no such prompt file; give the path of the {suite} jsonl")
    records = parse_suite_lines(suite, path.read_text(encoding="utf-8").splitlines(), source=path)
    source = SOURCES.get(suite)
    return records, SuiteFile(suite, str(path), sha256_file(path), source.sha256 if source else None)


def parse_suite_lines(suite: str, lines: Iterable[str], *, source: str | os.PathLike) -> list[PromptRecord]:
    """Parse jsonl ``lines`` of ``suite``; blank lines are skipped but still counted for line numbers."""
    parse = {"geneval_pp": _parse_geneval, "geneval": _parse_geneval, "imagine": _parse_imagine,
             "custom": _parse_custom}[suite]
    base_dir = Path(source).parent
    records: list[PromptRecord] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SuiteFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise SuiteFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        records.append(parse(suite, obj, number, where, base_dir))
    if not records:
        raise SuiteFileError(f"{source}: no prompts in the file")
    duplicates = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if duplicates:
        raise SuiteFileError(f"{source}: duplicate prompt ids {sorted(duplicates)[:5]}; ids must be unique")
    return records


def _require_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SuiteFileError(f"{where}: field {key!r} must be a non-empty string; got {value!r}")
    return value.strip()


def _objects(obj: dict, key: str, where: str, required: bool) -> tuple[dict[str, Any], ...]:
    items = obj.get(key)
    if items is None and not required:
        return ()
    if not isinstance(items, list) or (required and not items):
        raise SuiteFileError(f"{where}: field {key!r} must be a non-empty list of objects; got {items!r}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("class"), str) or not item["class"].strip():
            raise SuiteFileError(f"{where}: {key}[{i}] must be an object with a 'class' string; got {item!r}")
        count = item.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SuiteFileError(f"{where}: {key}[{i}].count must be a positive integer; got {count!r}")
        unknown = set(item) - _OBJECT_KEYS
        if unknown:
            raise SuiteFileError(f"{where}: {key}[{i}] has unknown keys {sorted(unknown)}; "
                                 f"known: {sorted(_OBJECT_KEYS)}")
        out.append({**item, "count": count})
    return tuple(out)


def _parse_geneval(suite: str, obj: dict, number: int, where: str, base_dir: Path) -> PromptRecord:
    tag = _require_str(obj, "tag", where)
    known = GENEVAL_PP_TAGS if suite == "geneval_pp" else GENEVAL_TAGS
    if tag not in known:
        raise SuiteFileError(f"{where}: unknown {suite} tag {tag!r}; known: {', '.join(known)}")
    return PromptRecord(id=f"{number:04d}", suite=suite, tag=tag, category=tag,
                        prompt=_require_str(obj, "prompt", where), line=number,
                        include=_objects(obj, "include", where, True),
                        exclude=_objects(obj, "exclude", where, False))


def _parse_imagine(suite: str, obj: dict, number: int, where: str, base_dir: Path) -> PromptRecord:
    kind = _require_str(obj, "type", where)
    if kind not in IMAGINE_CATEGORIES:
        raise SuiteFileError(f"{where}: unknown Imagine-Bench type {kind!r}; known: {', '.join(IMAGINE_CATEGORIES)}")
    return PromptRecord(id=f"{number:04d}", suite=suite, tag=kind, category=IMAGINE_CATEGORIES[kind],
                        prompt=_require_str(obj, "instruction", where), line=number,
                        note=_require_str(obj, "note", where), extra={"published_id": obj.get("id")})


def _parse_custom(suite: str, obj: dict, number: int, where: str, base_dir: Path) -> PromptRecord:
    unknown = set(obj) - {"id", "prompt", "tag", "include", "exclude", "note", "reference_images"}
    if unknown:
        raise SuiteFileError(f"{where}: unknown fields {sorted(unknown)}; a custom line may have id, prompt, tag, "
                             "include, exclude, note, reference_images")
    rid = obj.get("id", f"{number:04d}")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise SuiteFileError(f"{where}: id must be 1-64 letters, digits, '-' or '_' (it names image files); "
                             f"got {rid!r}")
    tag = obj.get("tag", "custom")
    if not isinstance(tag, str) or not tag.strip():
        raise SuiteFileError(f"{where}: tag must be a non-empty string; got {tag!r}")
    note = obj.get("note")
    if note is not None and (not isinstance(note, str) or not note.strip()):
        raise SuiteFileError(f"{where}: note must be a non-empty string when given; got {note!r}")
    include = _objects(obj, "include", where, False)
    if note is not None and include:
        raise SuiteFileError(f"{where}: give either include (a checklist, judged all-or-nothing) or note "
                             "(an Imagine-style explanation, scored 0-10), not both")
    refs = obj.get("reference_images", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise SuiteFileError(f"{where}: reference_images must be a list of paths; got {refs!r}")
    resolved = []
    for ref in refs:
        p = Path(ref) if Path(ref).is_absolute() else base_dir / ref
        if not p.is_file():
            raise SuiteFileError(f"{where}: reference image {ref!r} not found (looked for {p}); paths are "
                                 "relative to the jsonl file")
        resolved.append(str(p.resolve()))
    return PromptRecord(id=rid, suite=suite, tag=tag.strip(), category=tag.strip(),
                        prompt=_require_str(obj, "prompt", where), line=number, include=include,
                        exclude=_objects(obj, "exclude", where, False), note=note.strip() if note else None,
                        reference_images=tuple(resolved))


# ------------------------------------------------------------------------------------------------ subsets
def limit_per_group(records: Sequence[PromptRecord], n: int | None) -> list[PromptRecord]:
    """The first ``n`` records of each tag (GenEval tag, Imagine type), in file order, so that a small run still
    covers every category. ``None`` keeps everything."""
    if n is None:
        return list(records)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"limit must be a positive integer (prompts per tag); got {n!r}")
    seen: Counter[str] = Counter()
    out = []
    for record in records:
        if seen[record.tag] < n:
            seen[record.tag] += 1
            out.append(record)
    return out


# ------------------------------------------------------------------------------------------------ download
def fetch_suite_file(suite: str, cache_dir: str | os.PathLike, *, base_url: str | None = None,
                     timeout_s: float = 60.0) -> Path:
    """The pinned public prompt file of ``suite`` in ``cache_dir``, downloaded first when absent or altered.

    ``base_url`` replaces ``https://raw.githubusercontent.com`` (a mirror, or a test server); the path below it
    is ``/<repo>/<revision>/<path>``. The bytes must hash to the pinned sha256, else nothing is kept.
    """
    import httpx

    source = SOURCES.get(suite)
    if source is None:
        raise ValueError(f"suite {suite!r} has no public prompt file; give the path of your jsonl")
    target = Path(cache_dir) / suite / source.filename
    if target.is_file() and sha256_file(target) == source.sha256:
        return target
    url = source.url if base_url is None else (
        f"{base_url.rstrip('/')}/{source.repo}/{source.revision}/{quote(source.path)}")
    try:
        response = httpx.get(url, timeout=timeout_s, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise SuiteFileError(f"could not download the {suite} prompts from {url}: {exc}; check the network, or "
                             "download the file yourself and pass its path") from exc
    if response.status_code != 200:
        raise SuiteFileError(f"could not download the {suite} prompts from {url}: HTTP {response.status_code}; "
                             "download the file yourself and pass its path")
    digest = hashlib.sha256(response.content).hexdigest()
    if digest != source.sha256:
        raise SuiteFileError(f"the {suite} prompts downloaded from {url} hash to {digest}, not the pinned "
                             f"{source.sha256}; the source changed or the download was altered; nothing was kept")
    return write_atomic(target, response.content)
