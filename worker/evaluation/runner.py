"""A benchmark run: generate every prompt's images, judge them, score, write the summary and reports. Resumable.

Run directory::

    run.json            what the run is (suite, prompt ids, generation settings, model); checked on resume
    images/<id>_<k>.png the k-th image of prompt <id> (k from 0), written atomically
    verdicts.sqlite     the judge's verdict cache (see ``judge.py``)
    results.jsonl       one line per image: prompt, image, verdict or failure
    summary.json        overall and per-group scores, settings, model, judge (see ``report.py``)
    report.md, report.html

Running again on the same directory resumes: images already on disk are not generated again and verdicts in the
cache are not asked again; only what is missing is done. A directory that holds another run (other suite, prompts
or generation settings) is refused, naming the difference.

The runner is torch-free: it is handed ``generate(record, seeds) -> images`` (one PIL image per seed);
:func:`pipeline_generate` builds one from a loaded ``Echo4oPipeline``. Progress goes to
``progress(stage, done, total)`` with stages ``generate`` and ``judge``; an exception raised there stops the run
(what is finished stays on disk).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from echo4o.files import write_atomic
from echo4o.jobs import (
    DEFAULT_RENORM_MIN,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_TIMESTEP_SHIFT,
    MAX_RENORM_MIN,
    MAX_SCALE,
    MAX_SHIFT,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    MIN_STEPS,
    SEED_MAX,
    SIDE_MULTIPLE,
    GenerateJob,
    MultirefJob,
    RenormType,
)
from echo4o.pnginfo import png_bytes
from worker.evaluation.judge import Judge, JudgeConfig, Verdict, VerdictCache, image_sha256
from worker.evaluation.protocols import protocol_for
from worker.evaluation.scoring import score_results
from worker.evaluation.suites import GENEVAL_PP_TAGS, GENEVAL_TAGS, PromptRecord, SuiteFile

GenerateFn = Callable[[PromptRecord, Sequence[int]], Sequence[Image.Image]]
DetectorFn = Callable[[PromptRecord, Image.Image], dict[str, Any]]
ProgressFn = Callable[[str, int, int], None]

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
VERDICTS_FILE = "verdicts.sqlite"
IMAGES_DIR = "images"


class GenerationSettings(BaseModel):
    """Sampling settings of a benchmark run, bounded by the job contract's limits (``echo4o.jobs``): every image is
    an ordinary ``GenerateJob`` / ``MultirefJob`` payload (:meth:`job`). Defaults are the published evaluation
    script's (Echo-4o's ``eval/gen/gen_images_mp.py``): 1024 px, 50 steps, text CFG 4 over the whole schedule,
    shift 3, renorm floor 0, seed 42. Image ``k`` of every prompt uses seed ``seed + k``. Prompts with reference
    images (custom) leave image CFG, interval, renorm and size to the multi-reference defaults."""

    height: int = Field(DEFAULT_SIZE[0], ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE,
                        description="Image height in pixels (text-to-image).")
    width: int = Field(DEFAULT_SIZE[1], ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE,
                       description="Image width in pixels (text-to-image).")
    num_steps: int = Field(DEFAULT_STEPS, ge=MIN_STEPS, le=MAX_STEPS, description="Schedule points (num_timesteps).")
    cfg_text_scale: float = Field(4.0, ge=0, le=MAX_SCALE, description="Text classifier-free guidance scale.")
    cfg_img_scale: float = Field(1.0, ge=0, le=MAX_SCALE, description="Image guidance scale (1: none, text-to-image).")
    cfg_interval: tuple[float, float] = Field((0.0, 1.0), description="Timesteps where CFG applies.")
    timestep_shift: float = Field(DEFAULT_TIMESTEP_SHIFT, gt=0, le=MAX_SHIFT,
                                  description="Timestep shift of the schedule.")
    cfg_renorm_type: RenormType = Field("global", description="CFG renormalisation.")
    cfg_renorm_min: float = Field(DEFAULT_RENORM_MIN, ge=0, le=MAX_RENORM_MIN,
                                  description="Floor of the renormalisation factor.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of image 0 of each prompt; image k uses seed + k.")
    images_per_prompt: int = Field(1, ge=1, le=16, description="Images generated (and judged) per prompt.")

    def job(self, record: PromptRecord, seed: int, references: Sequence[str] = ()) -> GenerateJob | MultirefJob:
        """The job payload of one image of ``record``: a ``MultirefJob`` over ``references`` (paths relative to
        the job's data dir) when the prompt has reference images, else a ``GenerateJob``. Validated by the job
        contract, as the gateway and the workers validate it."""
        common: dict[str, Any] = {"prompt": record.prompt, "num_steps": self.num_steps, "seed": seed,
                                  "cfg_text_scale": self.cfg_text_scale, "timestep_shift": self.timestep_shift,
                                  "cfg_renorm_min": self.cfg_renorm_min}
        if record.reference_images:
            return MultirefJob(references=list(references), **common)
        return GenerateJob(height=self.height, width=self.width, cfg_img_scale=self.cfg_img_scale,
                           cfg_interval=self.cfg_interval, cfg_renorm_type=self.cfg_renorm_type, **common)


# GenEval's protocol judges 4 images per prompt; GenEval++ and Imagine-Bench name one image per prompt.
PAPER_IMAGES_PER_PROMPT = {"geneval": 4, "geneval_pp": 1, "imagine": 1, "custom": 1}


def paper_settings(suite: str, **overrides: Any) -> GenerationSettings:
    """The published evaluation settings for ``suite``, with ``overrides`` applied."""
    return GenerationSettings(**{"images_per_prompt": PAPER_IMAGES_PER_PROMPT[suite], **overrides})


def pipeline_generate(pipe: Any, settings: GenerationSettings) -> GenerateFn:
    """A generate function over a loaded ``Echo4oPipeline`` (or anything with its call signature)."""

    def generate(record: PromptRecord, seeds: Sequence[int]) -> list[Image.Image]:
        paths = [Path(p).resolve() for p in record.reference_images]
        root = Path(os.path.commonpath([p.parent for p in paths])) if paths else None
        images = []
        for seed in seeds:
            job = settings.job(record, seed, [p.relative_to(root).as_posix() for p in paths] if root else ())
            kwargs = job.to_pipeline_kwargs(root) if isinstance(job, MultirefJob) else job.to_pipeline_kwargs()
            images.append(pipe(**kwargs).images[0])
        return images

    return generate


class RunMismatch(ValueError):
    """The run directory holds another run; the message names what differs and how to proceed."""


def image_name(record: PromptRecord, k: int) -> str:
    return f"{record.id}_{k}.png"


def _png_bytes(image: Image.Image) -> bytes:
    return png_bytes(image.convert("RGB"))  # at ECHO4O_PNG_COMPRESS_LEVEL


def _check_or_write_run_file(out: Path, identity: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        for key in ("suite", "prompt_ids", "generation"):
            if previous.get(key) != identity[key]:
                raise RunMismatch(f"{out} holds another run: its {key} differs "
                                  f"({_diff(previous.get(key), identity[key])}); resume with the same suite, limit and "
                                  "settings, or choose a new output directory")
    write_atomic(path, json.dumps(identity, indent=2).encode())


def _diff(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)
    if isinstance(old, list) and isinstance(new, list):
        return f"{len(old)} prompts then, {len(new)} now"
    return f"{old!r} then, {new!r} now"


def run_benchmark(records: Sequence[PromptRecord], out_dir: str | os.PathLike, *, suite: str,
                  generate: GenerateFn, generation: GenerationSettings, judge: Judge | JudgeConfig | None = None,
                  detector: DetectorFn | None = None, progress: ProgressFn | None = None,
                  model: dict[str, Any] | None = None, suite_file: SuiteFile | None = None,
                  limit: int | None = None, compare: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate, judge and score ``records`` into ``out_dir``; returns the summary (also in ``summary.json``).

    ``judge`` (a :class:`JudgeConfig`, used with the run's verdict cache, or a ready :class:`Judge`) is needed to
    score GenEval++, Imagine-Bench and custom prompts, ``detector`` to score GenEval;
    without them the images are made and left unscored, and the summary says so. ``compare``: another run's
    summary to show side by side in the reports.
    """
    if not records:
        raise ValueError("no prompts to run: the suite (after --limit) is empty")
    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    started = time.time()
    identity = {"suite": suite, "prompt_ids": [r.id for r in records], "generation": generation.model_dump(mode="json"),
                "model": model or {}, "limit": limit}
    _check_or_write_run_file(out, identity)
    report_progress = progress or (lambda stage, done, total: None)

    generated = _generate_all(records, out, generate, generation, report_progress)
    own_judge = isinstance(judge, JudgeConfig)
    if own_judge:
        judge = Judge(judge, open_judge_cache(out))
    try:
        results, asked = _judge_all(records, out, generation, judge, detector, report_progress)
    finally:
        if own_judge:
            judge.cache.close()
            judge.close()

    write_atomic(out / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results).encode())
    order = GENEVAL_PP_TAGS if suite == "geneval_pp" else GENEVAL_TAGS if suite == "geneval" else ()
    scores = score_results(suite, results, tag_order=order)
    notes = list(scores.get("notes", []))
    if judge is None and suite != "geneval":
        notes.append("no judge was configured: images were generated and left unscored.")
    summary = {
        "suite": suite,
        "overall": scores["overall"],
        **({"overall_corrected": scores["overall_corrected"]} if "overall_corrected" in scores else {}),
        "metric": scores["metric"],
        "groups": {g["name"]: g["score"] for g in scores.get("groups", [])},
        "scores": scores,
        "settings": {**generation.model_dump(mode="json"), "limit": limit},
        "prompts": {"count": len(records), "file": suite_file.path if suite_file else None,
                    "sha256": suite_file.sha256 if suite_file else None,
                    "pinned": suite_file.matches_pinned if suite_file else None},
        "model": model or {},
        "judge": ({**judge.config.public(), "protocols": sorted({p.key for r in records
                                                                  if (p := protocol_for(r)) is not None})}
                  if judge is not None else None),
        "detector": getattr(detector, "name", None) or (type(detector).__name__ if detector else None),
        "counts": {"images": len(results), "generated_this_run": generated, "judge_requests_this_run": asked,
                   "judged": scores["judged"], "failed": scores["failed"]},
        "notes": notes,
        "started": started,
        "finished": time.time(),
    }
    from worker.evaluation.report import write_reports

    write_reports(out, summary, results, compare=compare)
    return summary


def _generate_all(records: Sequence[PromptRecord], out: Path, generate: GenerateFn, settings: GenerationSettings,
                  progress: ProgressFn) -> int:
    total = len(records) * settings.images_per_prompt
    done = sum(1 for r in records for k in range(settings.images_per_prompt)
               if (out / IMAGES_DIR / image_name(r, k)).is_file())
    progress("generate", done, total)
    made = 0
    for record in records:
        missing = [k for k in range(settings.images_per_prompt)
                   if not (out / IMAGES_DIR / image_name(record, k)).is_file()]
        if not missing:
            continue
        images = list(generate(record, [settings.seed + k for k in missing]))
        if len(images) != len(missing):
            raise RuntimeError(f"generate returned {len(images)} images for prompt {record.id}, expected "
                               f"{len(missing)} (one per seed)")
        for k, image in zip(missing, images, strict=True):
            write_atomic(out / IMAGES_DIR / image_name(record, k), _png_bytes(image))
            made += 1
            done += 1
            progress("generate", done, total)
    return made


def _judge_all(records: Sequence[PromptRecord], out: Path, settings: GenerationSettings, judge: Judge | None,
               detector: DetectorFn | None, progress: ProgressFn) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    for record in records:
        for k in range(settings.images_per_prompt):
            name = image_name(record, k)
            protocol = protocol_for(record)
            rows.append({"id": record.id, "k": k, "tag": record.tag, "category": record.category,
                         "prompt": record.prompt, "image": f"{IMAGES_DIR}/{name}",
                         "protocol": protocol.name if protocol else "detector", "status": "unscored",
                         "verdict": None, "error": None, "attempts": 0, "cached": False, "record": record})
    total = len(rows)
    asked = 0

    def finish(row: dict[str, Any], verdict: Verdict) -> None:
        row.update(status=verdict.status, verdict=verdict.verdict, error=verdict.error, attempts=verdict.attempts,
                   cached=verdict.cached, raw=verdict.raw, image_sha256=verdict.meta.get("image_sha256"))

    if detector is not None:
        for i, row in enumerate(r for r in rows if r["protocol"] == "detector"):
            image = Image.open(out / row["image"]).convert("RGB")
            try:
                v = detector(row["record"], image)
                finish(row, Verdict("ok", verdict={"correct": bool(v["correct"]), "reason": str(v.get("reason", ""))}))
            except Exception as exc:  # a detector crash on one image is a recorded failure, not a lost run
                finish(row, Verdict("failed", error=f"detector error: {exc!r}"))
            progress("detect", i + 1, total)
    if judge is not None:
        todo = [r for r in rows if r["protocol"] != "detector"]
        items = [(r["record"], (out / r["image"]).read_bytes(), protocol_for(r["record"])) for r in todo]
        done = 0
        progress("judge", done, len(todo))

        def on_done(i: int, verdict: Verdict) -> None:
            nonlocal done, asked
            finish(todo[i], verdict)
            asked += 0 if verdict.cached else verdict.attempts
            done += 1
            progress("judge", done, len(todo))

        judge.judge_many(items, on_done=on_done)
    for row in rows:
        row.pop("record")
        if row.get("image_sha256") is None:
            row["image_sha256"] = image_sha256((out / row["image"]).read_bytes())
    return rows, asked


def open_judge_cache(out_dir: str | os.PathLike) -> VerdictCache:
    """The verdict cache of a run directory (created when absent)."""
    return VerdictCache(Path(out_dir) / VERDICTS_FILE)
