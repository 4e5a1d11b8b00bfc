"""Job payloads: bounds, defaults, seed drawing, presets and the conversion to pipeline kwargs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image
from pydantic import ValidationError

from echo4o.jobs import (
    ASPECT_PRESETS,
    GenerateJob,
    MultirefJob,
    describe_validation_error,
    parse_job,
)
from echo4o.settings import get_settings


def _error_locs(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_defaults_and_seed_drawn_and_recorded() -> None:
    job = GenerateJob(prompt="a red cube")
    assert job.num_steps == 50 and job.num_images == 1 and job.priority == 5
    assert job.height is None and job.width is None
    assert 0 <= job.seed <= 2**32 - 1
    stored = job.model_dump(mode="json")
    assert stored["seed"] == job.seed  # recorded: re-validating the stored params keeps the seed
    assert GenerateJob.model_validate(stored).seed == job.seed
    # explicit null is "absent" too
    assert isinstance(GenerateJob(prompt="x", seed=None).seed, int)
    seeds = {GenerateJob(prompt="x").seed for _ in range(8)}
    assert len(seeds) > 1


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"height": 33, "width": 32}, "height"),
        ({"height": 32, "width": 1040}, "width"),
        ({"height": 0, "width": 32}, "height"),
        ({"height": 32}, "width"),
        ({"num_steps": 1}, "num_steps"),
        ({"num_steps": 101}, "num_steps"),
        ({"cfg_text_scale": float("nan")}, "cfg_text_scale"),
        ({"cfg_img_scale": float("inf")}, "cfg_img_scale"),
        ({"cfg_text_scale": 1e9}, "cfg_text_scale"),
        ({"cfg_interval": [0.6, 0.2]}, "cfg_interval"),
        ({"cfg_interval": [0.0, 1.5]}, "cfg_interval"),
        ({"cfg_renorm_type": "bogus"}, "cfg_renorm_type"),
        ({"cfg_renorm_min": 2.0}, "cfg_renorm_min"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"num_images": 5}, "num_images"),
        ({"priority": 10}, "priority"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"aspect_ratio": "4:3", "height": 1024, "width": 1024}, "aspect_ratio"),
        ({"timestep_shift": 0}, "timestep_shift"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_out_of_bounds_fields_name_the_field(fields: dict, loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateJob(prompt="ok", **fields)
    assert loc in _error_locs(info.value)
    assert describe_validation_error(info.value).startswith(loc)


def test_prompt_bounds_follow_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("", "   \n"):
        with pytest.raises(ValidationError) as info:
            GenerateJob(prompt=bad)
        assert _error_locs(info.value) == {"prompt"}
    monkeypatch.setenv("ECHO4O_MAX_PROMPT_CHARS", "10")
    get_settings.cache_clear()
    GenerateJob(prompt="x" * 10)
    with pytest.raises(ValidationError) as info:
        GenerateJob(prompt="x" * 11)
    assert "ECHO4O_MAX_PROMPT_CHARS" in describe_validation_error(info.value)


def test_aspect_presets_resolve_to_sizes() -> None:
    for name, (h, w) in ASPECT_PRESETS.items():
        job = GenerateJob(prompt="x", aspect_ratio=name)
        assert (job.height, job.width) == (h, w)
        assert h % 16 == 0 and w % 16 == 0 and max(h, w) <= 1024
        # the stored form (preset plus resolved size) validates again unchanged
        again = GenerateJob.model_validate(job.model_dump(mode="json"))
        assert (again.height, again.width, again.aspect_ratio) == (h, w, name)


def test_generate_pipeline_kwargs() -> None:
    job = GenerateJob(prompt="p", height=64, width=32, num_steps=3, cfg_interval=[0.1, 0.9], seed=7, priority=9)
    kw = job.to_pipeline_kwargs()
    assert kw["height"] == 64 and kw["width"] == 32 and kw["num_steps"] == 3 and kw["seed"] == 7
    assert kw["cfg_interval"] == (0.1, 0.9)
    assert "priority" not in kw and "model_version" not in kw and "aspect_ratio" not in kw
    # unset options are left to the pipeline's per-mode defaults
    assert "cfg_text_scale" not in kw and "cfg_img_scale" not in kw and "cfg_renorm_type" not in kw
    assert "height" not in GenerateJob(prompt="p").to_pipeline_kwargs()


def test_multiref_references(data_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    (data_dir / "uploads" / "j").mkdir(parents=True)
    Image.new("RGB", (40, 24), (200, 10, 10)).save(data_dir / "uploads" / "j" / "0.png")
    Image.new("L", (24, 40), 128).save(data_dir / "uploads" / "j" / "1.png")
    job = MultirefJob(prompt="combine", references=["uploads/j/0.png", "uploads/j/1.png"])
    kw = job.to_pipeline_kwargs()
    assert [im.size for im in kw["images"]] == [(40, 24), (24, 40)]
    assert all(im.mode == "RGB" for im in kw["images"])

    for bad in (["/etc/passwd"], ["../x.png"], ["uploads/../../x.png"], [""]):
        with pytest.raises(ValidationError) as info:
            MultirefJob(prompt="x", references=bad)
        assert _error_locs(info.value) == {"references"}
        assert "references.0" in describe_validation_error(info.value)
    with pytest.raises(ValidationError):
        MultirefJob(prompt="x", references=[])

    monkeypatch.setenv("ECHO4O_MAX_REFERENCES", "2")
    get_settings.cache_clear()
    with pytest.raises(ValidationError) as info:
        MultirefJob(prompt="x", references=["a.png"] * 3)
    assert "ECHO4O_MAX_REFERENCES" in describe_validation_error(info.value)

    missing = MultirefJob(prompt="x", references=["uploads/j/9.png"])
    with pytest.raises(ValueError, match=r"references\.0"):
        missing.to_pipeline_kwargs()


def test_parse_job_dispatches_on_kind() -> None:
    assert isinstance(parse_job("generate", {"prompt": "x"}), GenerateJob)
    assert isinstance(parse_job("multiref", {"prompt": "x", "references": ["a.png"]}), MultirefJob)
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_job("paint", {"prompt": "x"})


def test_module_is_torch_free() -> None:
    code = "import sys, echo4o.jobs; assert 'torch' not in sys.modules, 'echo4o.jobs imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
