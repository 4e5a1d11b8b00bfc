"""Example prompts, and example reference images drawn at run time with Pillow (no binary assets)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

TEXT_EXAMPLES = [
    # surreal
    "A glass whale swimming through a desert at sunset, sand dunes reflected in its transparent body, "
    "cinematic light",
    # counting
    "Exactly five red apples and two green pears arranged in a row on a wooden table, studio photo",
    "A cozy reading nook with a cat asleep on a stack of books, warm lamp light, watercolor",
]

MULTIREF_INSTRUCTIONS = [
    "Put the red ball from the first image on the blue cube from the second image, on a sunny beach",
    "Place the object of the first image next to the object of the second image in a modern living room",
]


def _canvas(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    """A vertical gradient background."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(size - 1, 1)
        color = tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (size, y)], fill=color)
    return img


def draw_red_ball(size: int = 256) -> Image.Image:
    img = _canvas(size, (235, 240, 250), (190, 200, 215))
    draw = ImageDraw.Draw(img)
    r = size // 4
    cx, cy = size // 2, size // 2
    draw.ellipse([cx - r + 10, cy + r - 6, cx + r + 10, cy + r + 14], fill=(150, 155, 170))  # shadow
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(205, 30, 40))
    draw.ellipse([cx - r // 2, cy - r // 2 - 6, cx - r // 6, cy - r // 6 - 6], fill=(245, 150, 150))  # shine
    return img


def draw_blue_cube(size: int = 256) -> Image.Image:
    img = _canvas(size, (250, 245, 230), (215, 205, 185))
    draw = ImageDraw.Draw(img)
    s = size // 3
    x0, y0 = size // 2 - s // 2 - s // 6, size // 2 - s // 6
    d = s // 3  # depth offset of the back face
    front = [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    top = [(x0, y0), (x0 + d, y0 - d), (x0 + s + d, y0 - d), (x0 + s, y0)]
    side = [(x0 + s, y0), (x0 + s + d, y0 - d), (x0 + s + d, y0 + s - d), (x0 + s, y0 + s)]
    draw.polygon(front, fill=(30, 70, 200))
    draw.polygon(top, fill=(90, 130, 235))
    draw.polygon(side, fill=(20, 45, 140))
    return img


def write_reference_examples(folder: Path) -> list[Path]:
    """Draw the example references into ``folder``; returns their paths (ball, then cube)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (("red-ball.png", draw_red_ball), ("blue-cube.png", draw_blue_cube)):
        path = folder / name
        draw().save(path)
        paths.append(path)
    return paths
