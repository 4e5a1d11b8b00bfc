"""Reference-image preprocessing: sizes worked out by hand from the resize rule, exact pixel values."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from worker.engine.image_processing import (
    VAE_RULE,
    VIT_RULE,
    prepare_reference,
    resized_size,
    to_rgb,
    vae_resize,
    vae_transform,
    vit_transform,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (1024, 1024)),  # already in range
        ((2000, 1000), (1024, 512)),  # scale 1024/2000 = 0.512 -> 1024 x 512
        ((300, 200), (768, 512)),  # up so the short side is 512: scale 2.56 -> 768 x 512
        ((1000, 1000), (992, 992)),  # 1000/16 = 62.5 rounds to even (62) -> 992
        ((4000, 3000), (1024, 768)),  # 0.256 -> 1024 x 768
        ((2048, 512), (1024, 256)),  # long thin: 2048 x 512 first, then capped to 1024 on the long side
        ((16, 16), (512, 512)),
    ],
)
def test_vae_sizes(size, expected):
    assert resized_size(*size, **VAE_RULE) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (980, 980)),  # 980/1024 -> 980 (70 x 14)
        ((1024, 512), (980, 490)),  # 0.957 -> 980 x 490 (35 x 14)
        ((100, 100), (224, 224)),  # up to the 224 minimum (16 x 14)
        ((768, 512), (770, 518)),  # scale 1; 768/14 = 54.86 -> 55 -> 770; 512/14 = 36.57 -> 37 -> 518
    ],
)
def test_vit_sizes(size, expected):
    assert resized_size(*size, **VIT_RULE) == expected


def test_max_pixels_shrinks_by_area():
    # the reference applies the AREA ratio as a linear scale (a quirk kept for exactness):
    # 100 x 100 over a 2500-pixel budget: scale 2500/10000 = 0.25 -> 25 -> round(2.5) = 2 -> 20 x 20
    assert resized_size(100, 100, max_size=200, min_size=10, stride=10, max_pixels=2500) == (20, 20)
    # img_num divides the budget: 20000 / 2 = 10000 is not over; 20000 / 4 = 5000 -> scale 0.5 -> 50 x 50
    assert resized_size(100, 100, max_size=200, min_size=10, stride=10, max_pixels=20000, img_num=2) == (100, 100)
    assert resized_size(100, 100, max_size=200, min_size=10, stride=10, max_pixels=20000, img_num=4) == (50, 50)


def test_vae_transform_solid_colour_exact_values():
    img = Image.new("RGB", (40, 24), (255, 0, 128))
    t = vae_transform(img)
    # short side 24 -> 512: scale 21.33; 40 * 21.33 = 853.3 -> 853; 853/16 = 53.3 -> 53 * 16 = 848
    assert t.shape == (3, 512, 848)
    assert t.dtype == torch.float32
    assert torch.all(t[0] == 1.0)  # (255/255 - 0.5) / 0.5
    assert torch.all(t[1] == -1.0)
    assert torch.allclose(t[2], torch.tensor((128 / 255 - 0.5) / 0.5), atol=1e-7)


def test_vit_transform_shape_and_range():
    img = Image.new("RGB", (1024, 512), (10, 20, 30))
    t = vit_transform(img)
    assert t.shape == (3, 490, 980)
    assert t.min() >= -1 and t.max() <= 1


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    img.putpixel((1, 0), (255, 0, 0, 128))  # half red over white: 0 * 128/255 + 255 * 127/255 = 127
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 127, 127)


def test_palette_with_transparency_key_and_grayscale():
    p = Image.new("P", (1, 1), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    loaded = Image.open(io.BytesIO(buf.getvalue()))
    out = to_rgb(loaded)
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 255, 255)  # top-left corner moved to top-right


def test_prepare_reference_resizes_once_and_feeds_both_encoders():
    img = Image.new("RGBA", (300, 200), (0, 128, 255, 255))
    ref = prepare_reference(img)
    assert ref.image.size == (768, 512) and ref.size_hw == (512, 768)
    assert ref.vae.shape == (3, 512, 768)
    assert ref.vit.shape == (3, 518, 770)  # ViT rule applied to the VAE-resized 768 x 512 image
    assert torch.equal(ref.vae, vae_transform(vae_resize(img.convert("RGB"))))
