"""Reference-image preprocessing as BAGEL / Echo-4o do it (``data/transforms.py``, ``data/data_utils.py``).

A reference image goes through, in order (the reference ``interleave_inference``):

1. ``to_rgb``: EXIF orientation applied (our addition: phone photos arrive rotated otherwise), then RGB, with
   transparent pixels composited on white (the reference ``pil_img2rgb``).
2. ``vae_resize``: the VAE resize rule (longest side <= 1024, shortest >= 512, both multiples of 16,
   bicubic with antialias). The generated image takes the size of the last reference after this step.
3. From that resized image: ``vae_transform`` (resize rule again, a no-op now, then ``[-1, 1]`` tensor) and
   ``vit_transform`` (longest <= 980, shortest >= 224, multiples of 14, SigLIP mean = std = 0.5).

``prepare_reference`` does 1-3. The arithmetic (Python ``round``, banker's rounding included) and the
tensor ops follow the reference so that the tensors are bitwise equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 14 * 14 * 9 * 1024  # the reference ImageTransform default
VAE_RULE = {"max_size": 1024, "min_size": 512, "stride": 16}
VIT_RULE = {"max_size": 980, "min_size": 224, "stride": 14}
MEAN = STD = 0.5  # both transforms normalise (x - 0.5) / 0.5 (SigLIP's values too)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-transposed RGB copy of ``img``; RGBA and images with a transparency key are composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return img.convert("RGB")


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def resized_size(
    width: int,
    height: int,
    *,
    max_size: int,
    min_size: int,
    stride: int,
    max_pixels: int = MAX_PIXELS,
    img_num: int = 1,
) -> tuple[int, int]:
    """``(width, height)`` after the reference resize rule: scale down so the longest side is at most
    ``max_size`` (never up for that), then up so the shortest side is at least ``min_size``, round both to
    multiples of ``stride``; then shrink again if over ``max_pixels / img_num`` or over ``max_size``."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_w, new_h = _apply_scale(width, height, scale, stride)
    if new_w * new_h > max_pixels / img_num:
        scale = max_pixels / img_num / (new_w * new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, stride)
    if max(new_w, new_h) > max_size:
        scale = max_size / max(new_w, new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, stride)
    return new_w, new_h


def _resize(img: Image.Image, rule: dict[str, int]) -> Image.Image:
    size = resized_size(*img.size, **rule)
    # torchvision's F.resize on a PIL image is PIL's bicubic resize (PIL always antialiases when shrinking);
    # resizing to the same size returns an unchanged copy
    return img.resize(size, Image.Resampling.BICUBIC)


def vae_resize(img: Image.Image) -> Image.Image:
    """Resize by the VAE rule (1024 / 512 / 16)."""
    return _resize(_ensure_rgb(img), VAE_RULE)


def vit_resize(img: Image.Image) -> Image.Image:
    """Resize by the ViT rule (980 / 224 / 14)."""
    return _resize(_ensure_rgb(img), VIT_RULE)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float32 in ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5`` as ToTensor + Normalize compute it."""
    arr = np.array(_ensure_rgb(img), dtype=np.uint8, copy=True)
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.full((3, 1, 1), MEAN, dtype=torch.float32)
    std = torch.full((3, 1, 1), STD, dtype=torch.float32)
    return t.sub_(mean).div_(std)


def vae_transform(img: Image.Image) -> torch.Tensor:
    """The reference ``ImageTransform(1024, 512, 16)``: ``(3, H, W)`` in ``[-1, 1]``, H and W multiples of 16."""
    return to_normalized_tensor(vae_resize(img))


def vit_transform(img: Image.Image) -> torch.Tensor:
    """The reference ``ImageTransform(980, 224, 14)`` with SigLIP mean/std 0.5: ``(3, H, W)``, multiples of 14."""
    return to_normalized_tensor(vit_resize(img))


@dataclass(frozen=True)
class PreparedReference:
    """One reference image ready for the context: ``image`` is the VAE-resized RGB image (its size is the
    output size when it is the last reference), ``vae`` and ``vit`` the two encoders' input tensors."""

    image: Image.Image
    vae: torch.Tensor
    vit: torch.Tensor

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.image.height, self.image.width


def prepare_reference(img: Image.Image) -> PreparedReference:
    """``to_rgb`` -> ``vae_resize`` -> (``vae_transform``, ``vit_transform``) of the resized image."""
    resized = vae_resize(to_rgb(img))
    return PreparedReference(image=resized, vae=vae_transform(resized), vit=vit_transform(resized))


def _ensure_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else to_rgb(img)
