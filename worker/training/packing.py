"""Token counting and packing of training samples into batches by token budget, as the reference trainer packs.

Tokens of one sample in the LLM sequence (each segment framed by two tokens, see :mod:`worker.training.objective`):

- text: ``len(ids) + 2`` (``<|im_start|> ids <|im_end|>``), unless the text is empty;
- each reference: VAE tokens ``(H/16) * (W/16) + 2`` then ViT tokens ``(H'/14) * (W'/14) + 2``, where ``H x W`` is
  the image after the VAE resize rule and ``H' x W'`` after the ViT rule (:class:`ImageRules`);
- the target: VAE tokens ``(H/16) * (W/16) + 2``.

Packing (:func:`pack`): samples are appended to the current pack until it holds at least ``expected_tokens``;
a sample that would push it past ``max_tokens`` waits in a small buffer (the pack is emitted when the buffer
is full, or when a buffered sample still does not fit), and buffered samples are taken first while the pack
is shorter than ``prefer_buffer_before``. A sample longer than ``max_tokens_per_sample`` is skipped and counted
(``too_long``). The defaults are the Echo-4o fine-tuning values (10240 expected, 11520 max, 10240 per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

from worker.engine.config import BagelConfig
from worker.engine.image_processing import resized_size
from worker.training.data import Sample, SkipCounts


@dataclass(frozen=True)
class ImageRules:
    """Resize rules of the two image encoders: longest side at most ``*_max``, shortest at least ``*_min``,
    both multiples of the encoder's stride (16 px per latent token for the VAE, 14 px per ViT patch).
    Defaults are the reference's (VAE 1024 / 512, ViT 980 / 224); tests use small values."""

    vae_max: int = 1024
    vae_min: int = 512
    vit_max: int = 980
    vit_min: int = 224

    def vae_size(self, width: int, height: int, stride: int) -> tuple[int, int]:
        """``(width, height)`` of an image after the VAE rule."""
        return resized_size(width, height, max_size=self.vae_max, min_size=self.vae_min, stride=stride)

    def vit_size(self, width: int, height: int, stride: int) -> tuple[int, int]:
        """``(width, height)`` of an image after the ViT rule."""
        return resized_size(width, height, max_size=self.vit_max, min_size=self.vit_min, stride=stride)


class TokenCounter:
    """Counts the LLM tokens of a sample for the model ``config`` (no image is resized to count)."""

    def __init__(self, config: BagelConfig, rules: ImageRules, encode: Callable[[str], list[int]]):
        self.config = config
        self.rules = rules
        self.encode = encode

    def vae_tokens(self, image: Image.Image) -> int:
        step = self.config.latent_downsample
        w, h = self.rules.vae_size(image.width, image.height, step)
        return (h // step) * (w // step) + 2

    def vit_tokens(self, image: Image.Image) -> int:
        """ViT tokens of a reference: the ViT rule applied to the VAE-resized image, as the engine does."""
        step = self.config.latent_downsample
        patch = self.config.vit.patch_size
        w, h = self.rules.vae_size(image.width, image.height, step)
        w, h = self.rules.vit_size(w, h, patch)
        return (h // patch) * (w // patch) + 2

    def text_tokens(self, text: str) -> int:
        return len(self.encode(text)) + 2 if text else 0

    def __call__(self, sample: Sample) -> int:
        refs = sum(self.vae_tokens(img) + self.vit_tokens(img) for img in sample.references)
        return self.text_tokens(sample.text) + refs + self.vae_tokens(sample.target)


@dataclass(frozen=True)
class PackingConfig:
    expected_tokens: int = 10240
    max_tokens: int = 11520
    max_tokens_per_sample: int = 10240
    prefer_buffer_before: int = 5120
    max_buffer: int = 50

    def __post_init__(self):
        if not 0 < self.expected_tokens <= self.max_tokens:
            raise ValueError(f"packing needs 0 < expected_tokens <= max_tokens; got {self.expected_tokens} and "
                             f"{self.max_tokens}")
        if self.max_tokens_per_sample > self.max_tokens:
            raise ValueError(f"max_tokens_per_sample ({self.max_tokens_per_sample}) must not exceed max_tokens "
                             f"({self.max_tokens}): such a sample could never be packed")


def pack(samples: Iterable[Sample], count: Callable[[Sample], int], config: PackingConfig,
         counts: SkipCounts | None = None) -> Iterator[list[Sample]]:
    """Group ``samples`` into packs by token budget (see the module doc). When ``samples`` ends, what is left
    (the current pack, then the buffer) is emitted too."""
    counts = counts if counts is not None else SkipCounts()
    current: list[Sample] = []
    size = 0
    buffer: list[tuple[Sample, int]] = []
    source = iter(samples)
    while True:
        from_buffer = bool(buffer) and size < config.prefer_buffer_before
        if from_buffer:
            sample, n = buffer.pop(0)
        else:
            sample = next(source, None)
            if sample is None:
                break
            n = count(sample)
            if n > config.max_tokens_per_sample:
                counts.skip("too_long", sample.source, f"{n} tokens > max_tokens_per_sample "
                                                       f"{config.max_tokens_per_sample}")
                continue
        if size + n > config.max_tokens:
            if not from_buffer and len(buffer) < config.max_buffer:
                buffer.append((sample, n))
                continue
            yield current
            current, size = [], 0
        current.append(sample)
        size += n
        if size >= config.expected_tokens:
            yield current
            current, size = [], 0
    for sample, n in buffer:
        if size + n > config.max_tokens and current:
            yield current
            current, size = [], 0
        current.append(sample)
        size += n
    if current:
        yield current
