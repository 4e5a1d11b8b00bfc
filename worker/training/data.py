"""Training data: streaming readers for the reference trainer's parquet layouts and for Echo-4o-Image's shards.

Layouts (detected per file, see :func:`detect_layout`):

- **text-to-image parquet** (the reference ``T2IIterableDataset``): an ``image`` column of encoded image bytes
  and a ``captions`` column holding a JSON object of captions (any keys); one caption is chosen per visit.
- **multi-reference parquet** (the reference edit datasets, as Echo-4o uses them): ``image_list`` (a list of
  encoded images) and ``instruction_list`` (a list of instructions, each a string or a list of alternative
  strings). All images but the last are references; the last is the target; the instruction is the last entry
  of ``instruction_list`` (one alternative chosen per visit).
- **Echo-4o-Image shards** (the published dataset: one folder per task, e.g. ``Surrel-Fantasy-Image/``,
  ``Multi-Reference-Image/``, ``Instruction-Following-Image/``, images in WebDataset ``.tar`` / ``.tar.gz``
  shards under ``images/``): members are grouped by key (the name up to the first dot). A key's target image is
  ``KEY.jpg`` / ``.png`` / ``.webp`` (or ``KEY.output.*``); its references, if any, ``KEY.ref0.*``,
  ``KEY.ref1.*``, ...; its text is ``KEY.txt`` or the ``prompt`` / ``instruction`` / ``caption`` field of
  ``KEY.json``. Text may also come from a ``*.jsonl`` / ``*.json`` record file next to ``images/`` whose
  records carry the key in ``key`` / ``id`` / ``__key__`` (and may list reference member names in
  ``input_images``).

Everything is streamed: parquet files one record batch at a time (pyarrow), shards member by member
(``tarfile`` in stream mode); nothing is loaded whole. A source is a local file or folder, or a Hugging Face
Hub dataset id (``owner/name``, read through ``HfFileSystem`` without a full download).

A row that cannot be used (undecodable image, bad caption JSON, no text, fewer than two images in a
multi-reference row) is skipped and counted in :class:`SkipCounts` under a reason; it is never fatal. A
source that yields no usable row at all, whose files have neither layout's columns, or that holds no data
file is a :class:`DataError` naming the problem and the fix.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from echo4o.logging import get_logger

log = get_logger(__name__)

TEXT_TO_IMAGE = "text-to-image"
MULTI_REFERENCE = "multi-reference"
ECHO4O_SHARDS = "echo4o-image"
T2I_COLUMNS = ("image", "captions")
MULTIREF_COLUMNS = ("image_list", "instruction_list")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELDS = ("prompt", "instruction", "caption", "text")
KEY_FIELDS = ("key", "id", "__key__")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# decompression-bomb guard, as the reference trainer sets for its parquet images
MAX_IMAGE_PIXELS = 20_000_000


class DataError(ValueError):
    """The training data cannot be used at all; the message names the source, the problem and the fix."""


@dataclass
class Sample:
    """One training example: the ``target`` image to generate, conditioned on ``references`` and ``text``.

    ``source`` says where it came from (``file#row``), for logs and skip reports.
    """

    target: Image.Image
    text: str
    references: list[Image.Image] = field(default_factory=list)
    source: str = ""

    @property
    def mode(self) -> str:
        return MULTI_REFERENCE if self.references else TEXT_TO_IMAGE


@dataclass
class SkipCounts:
    """Rows seen, rows used and rows skipped per reason (``reasons``), for the run's report."""

    seen: int = 0
    used: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.reasons[reason] += 1
        if self.reasons[reason] <= 3:  # the first few of each kind are worth a log line, not every one
            log.warning("training row skipped", extra={"reason": reason, "where": where, "detail": detail[:200]})

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "used": self.used, "skipped": self.skipped, "reasons": dict(self.reasons)}


# ---------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFile:
    """One data file of a source: ``path`` on ``fs`` (None: the local filesystem)."""

    path: str
    fs: Any = None

    def open(self):
        return open(self.path, "rb") if self.fs is None else self.fs.open(self.path, "rb")

    @property
    def is_parquet(self) -> bool:
        return self.path.endswith(".parquet")


def list_files(source: str | Path, *, token: str | None = None) -> list[DataFile]:
    """The parquet files and tar shards of ``source`` (a file, a folder searched recursively, or a Hub dataset
    id), sorted by path so every process sees one order."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            files = [path]
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_name(p.name))
        found = [DataFile(str(p)) for p in files if _is_data_name(p.name)]
    elif _HUB_ID.match(text):
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem(token=token)
        try:
            names = sorted(fs.find(f"datasets/{text}"))
        except Exception as exc:  # noqa: BLE001 - network, missing repo, gated: the same advice
            raise DataError(f"cannot list Hub dataset {text} ({type(exc).__name__}: {str(exc)[:200]}); check the "
                            f"id, the network and ECHO4O_HF_TOKEN / HF_TOKEN for a private or gated dataset") from exc
        found = [DataFile(n, fs) for n in names if _is_data_name(n.rsplit("/", 1)[-1])]
    else:
        raise DataError(f"training data {text!r} is neither an existing file or folder nor a Hub dataset id "
                        f"(owner/name); pass a folder of .parquet files or Echo-4o-Image .tar shards")
    if not found:
        raise DataError(f"no data files in {text}: expected .parquet files (text-to-image: image + captions; "
                        f"multi-reference: image_list + instruction_list) or Echo-4o-Image .tar/.tar.gz shards")
    return found


def _is_data_name(name: str) -> bool:
    return name.endswith((".parquet", ".tar", ".tar.gz", ".tgz"))


def detect_layout(columns: Sequence[str], where: str) -> str:
    """``text-to-image`` or ``multi-reference`` from a parquet file's column names; a :class:`DataError` naming
    the columns found and the ones expected otherwise."""
    names = set(columns)
    if set(MULTIREF_COLUMNS) <= names:
        return MULTI_REFERENCE
    if set(T2I_COLUMNS) <= names:
        return TEXT_TO_IMAGE
    raise DataError(f"{where} has columns {sorted(names)}; a text-to-image file needs {list(T2I_COLUMNS)} and a "
                    f"multi-reference file {list(MULTIREF_COLUMNS)}. Rename the columns or convert the file.")


# ---------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------


class TrainingData:
    """An endless (``repeat=True``) or single-pass stream of :class:`Sample` from ``source``.

    ``choice_seed`` seeds the choice among alternative captions / instructions, so two readers of the same
    source give the same samples in the same order. ``counts`` accumulates over the whole life of the object.
    The first pass that yields no usable sample raises a :class:`DataError` with the skip counts.
    """

    def __init__(self, source: str | Path, *, repeat: bool = True, choice_seed: int = 0, token: str | None = None,
                 batch_rows: int = 64):
        self.source = str(source)
        self.files = list_files(source, token=token)
        self.repeat = repeat
        self.choice_seed = choice_seed
        self.batch_rows = batch_rows
        self.counts = SkipCounts()

    def __iter__(self) -> Iterator[Sample]:
        epoch = 0
        while True:
            rng = random.Random(f"{self.choice_seed}:{epoch}")
            used = 0
            for f in self.files:
                reader = self._parquet if f.is_parquet else self._shard
                for sample in reader(f, rng):
                    used += 1
                    self.counts.used += 1
                    yield sample
            if used == 0:
                raise DataError(f"no usable row in {self.source}: {self.counts.seen} rows read, all skipped "
                                f"({dict(self.counts.reasons) or 'the files hold no rows'}). Fix the rows named "
                                f"in the log warnings, or point to the right data.")
            epoch += 1
            if not self.repeat:
                return

    # -- parquet --------------------------------------------------------------------------------------
    def _parquet(self, f: DataFile, rng: random.Random) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        with f.open() as handle:
            try:
                pf = pq.ParquetFile(handle)
            except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: not a parquet file
                raise DataError(f"{f.path} is not a readable parquet file ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); replace or remove it") from exc
            layout = detect_layout(pf.schema_arrow.names, f.path)
            columns = list(MULTIREF_COLUMNS if layout == MULTI_REFERENCE else T2I_COLUMNS)
            row = 0
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=columns):
                for record in batch.to_pylist():
                    where = f"{f.path}#{row}"
                    row += 1
                    self.counts.seen += 1
                    parse = _parse_multiref_row if layout == MULTI_REFERENCE else _parse_t2i_row
                    sample = parse(record, where, rng, self.counts)
                    if sample is not None:
                        yield sample

    # -- Echo-4o-Image shards --------------------------------------------------------------------------
    def _shard(self, f: DataFile, rng: random.Random) -> Iterator[Sample]:
        records = _side_records(f)
        with f.open() as handle:
            try:
                tar = tarfile.open(fileobj=handle, mode="r|*")
            except tarfile.TarError as exc:
                raise DataError(f"{f.path} is not a readable tar shard ({exc}); replace or remove it") from exc
            key, members = None, {}
            try:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = info.name.rsplit("/", 1)[-1]
                    member_key, _, suffix = name.partition(".")
                    if member_key != key and key is not None:
                        sample = self._shard_sample(key, members, records, f.path, rng)
                        if sample is not None:
                            yield sample
                        members = {}
                    key = member_key
                    members[suffix.lower()] = tar.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                self.counts.skip("truncated_shard", f.path, str(exc))
            if key is not None:
                sample = self._shard_sample(key, members, records, f.path, rng)
                if sample is not None:
                    yield sample

    def _shard_sample(self, key: str, members: dict[str, bytes], records: dict[str, dict], path: str,
                      rng: random.Random) -> Sample | None:
        where = f"{path}#{key}"
        self.counts.seen += 1
        meta = dict(records.get(key, {}))
        if "json" in members:
            try:
                meta.update(json.loads(members["json"]))
            except (ValueError, UnicodeDecodeError) as exc:
                self.counts.skip("bad_json", where, str(exc))
                return None
        text = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else _first_text(meta)
        if not text:
            self.counts.skip("no_text", where)
            return None
        target_bytes = next((members[s] for s in (*IMAGE_EXTS, *(f"output.{e}" for e in IMAGE_EXTS))
                             if s in members), None)
        if target_bytes is None:
            self.counts.skip("no_image", where)
            return None
        ref_names = sorted((s for s in members if s.startswith("ref") and s.rsplit(".", 1)[-1] in IMAGE_EXTS),
                           key=_natural)
        for name in meta.get("input_images") or []:
            member = str(name).rsplit("/", 1)[-1].partition(".")[2].lower()
            if member in members and member not in ref_names:
                ref_names.append(member)
        images = [_decode(b, where, self.counts) for b in [*(members[n] for n in ref_names), target_bytes]]
        if any(img is None for img in images):
            return None
        return Sample(target=images[-1], text=text, references=images[:-1], source=where)


def _parse_t2i_row(record: dict, where: str, rng: random.Random, counts: SkipCounts) -> Sample | None:
    captions = record.get("captions")
    try:
        parsed = json.loads(captions) if isinstance(captions, str | bytes) else captions
    except (ValueError, UnicodeDecodeError) as exc:
        counts.skip("bad_captions", where, str(exc))
        return None
    if isinstance(parsed, dict):
        texts = [str(v).strip() for v in parsed.values() if isinstance(v, str) and v.strip()]
    elif isinstance(parsed, list):
        texts = [str(v).strip() for v in parsed if isinstance(v, str) and v.strip()]
    else:
        texts = []
    if not texts:
        counts.skip("no_caption", where)
        return None
    text = rng.choice(texts)
    image = _decode(record.get("image"), where, counts)
    if image is None:
        return None
    return Sample(target=image, text=text, source=where)


def _parse_multiref_row(record: dict, where: str, rng: random.Random, counts: SkipCounts) -> Sample | None:
    images = record.get("image_list") or []
    instructions = record.get("instruction_list") or []
    if len(images) < 2:
        counts.skip("too_few_images", where, f"{len(images)} image(s); a multi-reference row needs references "
                                             f"and a target")
        return None
    options = instructions[-1] if instructions else None
    if isinstance(options, str):
        options = [options]
    texts = [t.strip() for t in (options or []) if isinstance(t, str) and t.strip()]
    if not texts:
        counts.skip("no_instruction", where)
        return None
    text = rng.choice(texts)
    decoded = [_decode(b, where, counts) for b in images]
    if any(img is None for img in decoded):
        return None
    return Sample(target=decoded[-1], text=text, references=decoded[:-1], source=where)


def _decode(data: Any, where: str, counts: SkipCounts) -> Image.Image | None:
    if isinstance(data, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if not isinstance(data, bytes | bytearray) or not data:
        counts.skip("no_image", where)
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                counts.skip("image_too_large", where, f"{img.width}x{img.height}")
                return None
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        counts.skip("bad_image", where, str(exc))
        return None


def _first_text(meta: dict) -> str:
    for name in TEXT_FIELDS:
        value = meta.get(name)
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _side_records(f: DataFile) -> dict[str, dict]:
    """Records of ``*.jsonl`` / ``*.json`` files in the shard's task folder (the parent of ``images/``), by key.
    Only local sources; a Hub source keeps its text inside the shards."""
    if f.fs is not None:
        return {}
    shard = Path(f.path)
    task = shard.parent.parent if shard.parent.name == "images" else shard.parent
    records: dict[str, dict] = {}
    for meta in sorted([*task.glob("*.jsonl"), *task.glob("*.json")]):
        try:
            text = meta.read_text(encoding="utf-8")
            rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if meta.suffix == ".jsonl"
                    else json.loads(text))
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta} is not readable JSON ({exc}); fix or remove it") from exc
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict):
                key = next((str(row[k]) for k in KEY_FIELDS if k in row), None)
                if key is not None:
                    records[key.rsplit("/", 1)[-1].partition(".")[0]] = row
    return records


# ---------------------------------------------------------------------------------------------------
# test data
# ---------------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path: str | Path, rows: list[dict], layout: str) -> Path:
    """Write ``rows`` as a parquet file of ``layout`` (``text-to-image``: dicts with ``image`` bytes and
    ``captions`` (a dict, stored as JSON text, or a str stored as is); ``multi-reference``: ``image_list`` and
    ``instruction_list``). Used by tests and by anyone converting data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == TEXT_TO_IMAGE:
        table = pa.table({
            "image": pa.array([r["image"] for r in rows], pa.binary()),
            "captions": pa.array([r["captions"] if isinstance(r["captions"], str) else json.dumps(r["captions"])
                                  for r in rows], pa.string()),
        })
    elif layout == MULTI_REFERENCE:
        table = pa.table({
            "image_list": pa.array([r["image_list"] for r in rows], pa.list_(pa.binary())),
            "instruction_list": pa.array([r["instruction_list"] for r in rows], pa.list_(pa.string())),
        })
    else:
        raise ValueError(f"layout must be {TEXT_TO_IMAGE!r} or {MULTI_REFERENCE!r}; got {layout!r}")
    pq.write_table(table, path, row_group_size=max(1, len(rows) // 2))
    return path


def synthetic_image(seed: int, size: int = 32) -> Image.Image:
    """A deterministic RGB test image: a colour gradient and a bright square whose place depends on ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = rng.uniform(0.2, 0.8, 3)
    arr = np.stack([base[0] * x, base[1] * y, base[2] * (1 - x)], axis=-1)
    s = size // 4
    r, c = rng.integers(0, size - s, 2)
    arr[r:r + s, c:c + s] = 1.0
    return Image.fromarray((arr * 255).astype("uint8"), "RGB")


def write_test_dataset(out_dir: str | Path, layout: str, num_rows: int = 4, size: int = 32,
                       num_references: int = 2, bad_rows: int = 0) -> Path:
    """A small dataset of ``layout`` (``text-to-image``, ``multi-reference`` or ``echo4o-image``) in
    ``out_dir``, ``size``-pixel images, ``bad_rows`` extra rows with undecodable images. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = ["a red square on a blue gradient", "a cat wearing a tiny hat", "a lighthouse at sunset",
               "a bowl of ramen from above", "a robot reading a book", "a snowy cabin in a pine forest"]
    broken = b"\x89PNG\r\n\x1a\nnot really an image"
    if layout == TEXT_TO_IMAGE:
        rows = [{"image": encode_image(synthetic_image(i, size)),
                 "captions": {"short": prompts[i % len(prompts)], "long": prompts[i % len(prompts)] + ", detailed"}}
                for i in range(num_rows)]
        rows += [{"image": broken, "captions": {"short": "broken"}} for _ in range(bad_rows)]
        write_parquet(out / "t2i-00000.parquet", rows, TEXT_TO_IMAGE)
    elif layout == MULTI_REFERENCE:
        rows = [{"image_list": [encode_image(synthetic_image(100 * i + j, size)) for j in range(num_references + 1)],
                 "instruction_list": [f"combine the images: {prompts[i % len(prompts)]}"]} for i in range(num_rows)]
        rows += [{"image_list": [broken, broken], "instruction_list": ["broken"]} for _ in range(bad_rows)]
        write_parquet(out / "multiref-00000.parquet", rows, MULTI_REFERENCE)
    elif layout == ECHO4O_SHARDS:
        task = out / "Multi-Reference-Image"
        (task / "images").mkdir(parents=True, exist_ok=True)
        records = []
        with tarfile.open(task / "images" / "0-5000.tar.gz", "w:gz") as tar:
            for i in range(num_rows + bad_rows):
                key = f"{i:05d}"
                members = {f"{key}.jpg": encode_image(synthetic_image(i, size), "JPEG") if i < num_rows else broken}
                for j in range(num_references):
                    members[f"{key}.ref{j}.png"] = encode_image(synthetic_image(1000 + 10 * i + j, size))
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                records.append({"key": key, "instruction": f"combine: {prompts[i % len(prompts)]}"})
        (task / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        raise ValueError(f"layout must be {TEXT_TO_IMAGE}, {MULTI_REFERENCE} or {ECHO4O_SHARDS}; got {layout!r}")
    return out
