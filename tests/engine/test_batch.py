"""Echo4oPipeline.generate_batch on the tiny model: several requests in one packed forward per step, each equal
to its own call; a cancelled or invalid request leaves the batch and the others go on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine import Echo4oPipeline
from worker.engine.image_processing import prepare_reference
from worker.engine.pipeline import batch_key, reference_output_size

SIZE = {"height": 32, "width": 48, "num_steps": 5}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Echo4oPipeline.from_pretrained(tiny_model, device="cpu", attention="sdpa")


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _requests() -> list[dict]:
    """Differing prompts, seeds, scales, intervals and renorms; one with references, two without."""
    return [
        {"prompt": "a red panda on a bed", "seed": 1, "output_type": "latent", **SIZE},
        {"prompt": "put them together", "images": [_image(40, 32, 0)], "seed": 7,
         "cfg_text_scale": 3.0, "cfg_img_scale": 1.5, "output_type": "latent", **SIZE},
        {"prompt": "a lighthouse at dusk", "seed": 123, "cfg_text_scale": 6.0, "cfg_interval": (0.5, 1.0),
         "cfg_renorm_type": "channel", "num_images": 2, "output_type": "latent", **SIZE},
    ]


class _Recorder:
    def __init__(self, cancel_at: int | None = None):
        self.steps: list[tuple[int, int]] = []
        self.cancel_at = cancel_at

    def __call__(self, step, total, preview):
        self.steps.append((step, total))
        if step == self.cancel_at:
            raise _Cancel(step)


class _Cancel(Exception):
    pass


def _counting_velocity(pipe, monkeypatch) -> list[int]:
    """Count the packed forwards (the real velocity still runs) and the rows of each."""
    calls: list[int] = []
    velocity = pipe.model.velocity

    def counted(x, t, layout, *args):
        calls.append(layout.num_branches)
        return velocity(x, t, layout, *args)

    monkeypatch.setattr(pipe.model, "velocity", counted)
    return calls


@pytest.fixture(scope="module")
def alone(pipe) -> list:
    """Each request of ``_requests()`` run by itself, with the steps its callback saw."""
    results = []
    for req in _requests():
        rec = _Recorder()
        out = pipe(**req, callback=rec)
        results.append((out, rec.steps))
    return results


def test_batch_equals_separate_calls_in_one_forward_per_step(pipe, alone, monkeypatch):
    requests = _requests()
    recorders = [_Recorder() for _ in requests]
    calls = _counting_velocity(pipe, monkeypatch)
    batch = pipe.generate_batch([{**req, "callback": rec} for req, rec in zip(requests, recorders, strict=True)])
    monkeypatch.undo()

    assert len(calls) == SIZE["num_steps"] - 1  # one packed forward per step for all requests
    # step 1: request 0 two branches, request 1 three, request 2 two for each of its two images
    assert calls[0] == 2 + 3 + 2 * 2
    for (out, steps), got, rec in zip(alone, batch, recorders, strict=True):
        assert isinstance(got, type(out)), got
        assert got.params == out.params
        assert len(got.images) == len(out.images)
        for a, b in zip(out.images, got.images, strict=True):
            assert (a - b).abs().max() < 1e-5
        assert rec.steps == steps  # the same step numbering as alone
        assert got.timings["batch_requests"] == 3 and got.timings["denoise_s"] > 0
    assert recorders[2].steps == [(s, 8) for s in range(1, 9)]  # 2 images x 4 steps, numbered 1..8


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(pipe, alone, monkeypatch):
    requests = _requests()
    contexts = []
    encode = pipe.encode_contexts

    def recording_encode(*args, **kwargs):
        contexts.append(encode(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(pipe, "encode_contexts", recording_encode)
    cancel = _Recorder(cancel_at=3)
    rest = _Recorder()
    # the cancelled one: request 2's images under request 0's prompt (no references: a reference costs a VAE
    # encode, seconds on a CPU)
    batch = pipe.generate_batch([requests[0], {**requests[2], "prompt": "a cat", "callback": cancel},
                                 {**requests[2], "callback": rest}])
    monkeypatch.undo()
    assert isinstance(batch[1], _Cancel) and batch[1].args == (3,)
    assert cancel.steps == [(1, 8), (2, 8), (3, 8)]  # stopped at once (image 0 of step 2)
    assert rest.steps == [(s, 8) for s in range(1, 9)]
    assert (batch[0].images[0] - alone[0][0].images[0]).abs().max() < 1e-5
    for a, b in zip(alone[2][0].images, batch[2].images, strict=True):
        assert (a - b).abs().max() < 1e-5
    # every request's caches were let go
    assert len(contexts) == 3
    assert all(k is None for ctx in contexts for cache in (ctx.full, ctx.text_dropped, ctx.image_dropped)
               for k in cache.keys)


def test_an_invalid_request_fails_alone(pipe, alone):
    good = _requests()[0]
    batch = pipe.generate_batch([{**good, "seed": -1}, good, {**good, "colour": "red"}, {"seed": 1}])
    assert isinstance(batch[0], ValueError) and "seed" in str(batch[0])
    assert (batch[1].images[0] - alone[0][0].images[0]).abs().max() < 1e-5
    assert isinstance(batch[2], ValueError) and "colour" in str(batch[2])
    assert isinstance(batch[3], ValueError) and "prompt" in str(batch[3])


@pytest.mark.parametrize(("change", "name"), [({"height": 64}, "height"), ({"width": 32}, "width"),
                                              ({"num_steps": 4}, "num_steps"),
                                              ({"timestep_shift": 2.0}, "timestep_shift")])
def test_requests_that_do_not_share_the_schedule_and_size_are_refused(pipe, change, name):
    a = {"prompt": "a cat", **SIZE}
    with pytest.raises(ValueError, match=f"request 0 has {name}=.* but request 1 has {name}="):
        pipe.generate_batch([a, {**a, **change}])
    assert batch_key(**a) != batch_key(**{**a, **change})


def test_batch_key_needs_no_model_and_follows_the_last_reference():
    """The key's size is the one a call resolves: the last reference's after the resize rule (prepare_reference
    gives the call its size), EXIF rotation included."""
    ref = _image(700, 300, 0)
    assert batch_key(prompt="x") == (1024, 1024, 50, 3.0)
    assert Echo4oPipeline.batch_key(prompt="x", height=32, width=48, num_steps=5) == (32, 48, 5, 3.0)
    key = batch_key(prompt="x", images=[_image(32, 32, 1), ref], num_steps=2)
    assert key == (*prepare_reference(ref).size_hw, 2, 3.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the sides swap
    buf = io.BytesIO()
    Image.new("RGB", (700, 300)).save(buf, format="JPEG", exif=exif.tobytes())
    rotated = Image.open(io.BytesIO(buf.getvalue()))
    assert reference_output_size(rotated) == prepare_reference(rotated).size_hw == (1024, 432)  # (h, w)
    assert reference_output_size(Image.new("RGB", (700, 300))) == (432, 1024)
    with pytest.raises(ValueError, match="num_steps"):
        batch_key(prompt="x", num_steps="many")


def test_branches_run_one_call_each_give_the_same_latents(pipe):
    """The benchmarks' sequential mode (one velocity call per row) equals the packed call."""
    requests = [_requests()[0], {**_requests()[2], "num_images": 1}]
    packed = pipe.generate_batch(requests)
    pipe._sequential_branches = True
    try:
        sequential = pipe.generate_batch(requests)
    finally:
        pipe._sequential_branches = False
    for a, b in zip(packed, sequential, strict=True):
        assert (a.images[0] - b.images[0]).abs().max() < 1e-5


def test_pil_images_of_a_batch_decode_together_as_they_decode_alone(pipe):
    """A batch decodes its images several per VAE call: the same pixels as alone up to one level of rounding."""
    requests = [{"prompt": f"a cat {i}", "seed": i, **SIZE} for i in range(2)]
    batch = pipe.generate_batch(requests)
    for req, got in zip(requests, batch, strict=True):
        alone = np.asarray(pipe(**req).images[0]).astype(int)
        assert np.abs(alone - np.asarray(got.images[0]).astype(int)).max() <= 1


def test_several_images_run_as_one_batch(pipe, monkeypatch):
    calls = _counting_velocity(pipe, monkeypatch)
    out = pipe("a cat", seed=5, num_images=3, output_type="latent", **SIZE)
    monkeypatch.undo()
    assert len(calls) == SIZE["num_steps"] - 1 and calls[0] == 3 * 2
    for k in range(3):  # image k draws its noise k-th, as three separate images of one stream
        assert torch.isfinite(out.images[k]).all()
    assert not torch.equal(out.images[0], out.images[1])
