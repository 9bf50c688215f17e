"""Procedural image-caption domains for the offline demo and the tests.

Two domains share one concept space (shape, colour, size, position) but differ the way a real
domain shift does:

* **source**: clean renders on a light background, saturated colours, uniform class frequencies,
  plain-English captions ("a large red circle in the top left").
* **target**: dark, noisy, textured "scan-like" renders with a shifted, desaturated palette,
  long-tailed shape frequencies, and a partly different vocabulary and caption style
  ("large round opacity, crimson tint, upper left").

A CLIP pretrained on the source retrieves the target poorly zero-shot; adapting it should close the
gap. Everything is deterministic under a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star"]
COLORS = {  # source palette, RGB
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "center"]

# The target's words for the same concepts: some shared ("cross", "small", "left"), most not.
TARGET_SHAPE_WORDS = {
    "circle": "round",
    "square": "boxy",
    "triangle": "wedge",
    "cross": "cross",
    "ring": "annular",
    "diamond": "rhombic",
    "bar": "linear",
    "star": "stellate",
}
TARGET_COLOR_WORDS = {
    "red": "crimson",
    "green": "emerald",
    "blue": "azure",
    "yellow": "amber",
    "purple": "violet",
    "orange": "ochre",
}
TARGET_POSITION_WORDS = {
    "top left": "upper left",
    "top right": "upper right",
    "bottom left": "lower left",
    "bottom right": "lower right",
    "center": "central",
}

SOURCE_TEMPLATES = [
    "a {size} {color} {shape} in the {position}",
    "a photo of a {color} {shape}, {size}, at the {position}",
    "{position}: a {size} {color} {shape}",
]
TARGET_TEMPLATES = [
    "{size} {shape} opacity, {color} tint, {position}",
    "{position} region shows a {size} {color} {shape} focus",
    "finding: {shape} {color} {size} lesion, {position}",
]

# Long tail for the target's shape classes: frequency of the k-th class ~ 1 / (k + 1) ** 1.1.
TARGET_SHAPE_WEIGHTS = np.array([1.0 / (k + 1) ** 1.1 for k in range(len(SHAPES))])


@dataclass(frozen=True)
class Sample:
    shape: str
    color: str
    size: str
    position: str

    def caption(self, domain: str, template: int) -> str:
        if domain == "source":
            words = dict(shape=self.shape, color=self.color, size=self.size, position=self.position)
            return SOURCE_TEMPLATES[template % len(SOURCE_TEMPLATES)].format(**words)
        words = dict(
            shape=TARGET_SHAPE_WORDS[self.shape],
            color=TARGET_COLOR_WORDS[self.color],
            size=self.size,
            position=TARGET_POSITION_WORDS[self.position],
        )
        return TARGET_TEMPLATES[template % len(TARGET_TEMPLATES)].format(**words)


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "triangle":
        return rot([(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)])
    if shape == "diamond":
        return rot([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "bar":
        return rot([(-r, -r * 0.3), (r, -r * 0.3), (r, r * 0.3), (-r, r * 0.3)])
    if shape == "cross":
        a, b = r, r * 0.33
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            theta = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(theta), rad * math.sin(theta)))
        return rot(pts)
    raise ValueError(f"not a polygon shape: {shape}")


def _target_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The target's palette: desaturated towards grey and brightened to stand out on a dark scan."""
    arr = np.asarray(rgb, dtype=np.float64)
    grey = arr.mean()
    mixed = 0.45 * arr + 0.55 * grey + 60.0
    return tuple(int(v) for v in np.clip(mixed, 0, 255))


def render(sample: Sample, domain: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one sample at 2x and downsample (anti-aliasing for free)."""
    big = size * 2
    if domain == "source":
        base = rng.integers(225, 250)
        canvas = Image.new("RGB", (big, big), (int(base), int(base), int(base) - 5))
        fill = COLORS[sample.color]
    else:
        # Dark textured background: a smooth random field plus grain.
        coarse = rng.normal(0.0, 1.0, size=(6, 6))
        field = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((big, big), Image.BICUBIC))
        bg = 45 + 18 * field + rng.normal(0, 6, size=(big, big))
        canvas = Image.fromarray(np.clip(np.stack([bg, bg * 0.95, bg * 1.05], -1), 0, 255).astype(np.uint8))
        fill = _target_color(COLORS[sample.color])

    draw = ImageDraw.Draw(canvas)
    radius = big * (0.13 if sample.size == "small" else 0.24) * rng.uniform(0.9, 1.1)
    anchors = {"left": 0.28, "right": 0.72, "top": 0.28, "bottom": 0.72, "center": 0.5}
    if sample.position == "center":
        cx = cy = 0.5
    else:
        vertical, horizontal = sample.position.split()
        cx, cy = anchors[horizontal], anchors[vertical]
    cx = (cx + rng.uniform(-0.04, 0.04)) * big
    cy = (cy + rng.uniform(-0.04, 0.04)) * big
    angle = rng.uniform(-0.25, 0.25)

    if sample.shape in ("circle", "ring"):
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if sample.shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.35)))
    else:
        draw.polygon(_shape_polygon(sample.shape, cx, cy, radius, angle), fill=fill)

    if domain == "target":
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=1.2))
        arr = np.asarray(canvas).astype(np.float64) + rng.normal(0, 10, size=(big, big, 3))
        canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return canvas.resize((size, size), Image.LANCZOS)


def sample_concepts(domain: str, num_images: int, rng: np.random.Generator) -> list[Sample]:
    if domain == "source":
        shape_p = np.full(len(SHAPES), 1.0 / len(SHAPES))
    else:
        shape_p = TARGET_SHAPE_WEIGHTS / TARGET_SHAPE_WEIGHTS.sum()
    shapes = rng.choice(len(SHAPES), size=num_images, p=shape_p)
    colors = rng.integers(0, len(COLORS), size=num_images)
    sizes = rng.integers(0, len(SIZES), size=num_images)
    positions = rng.integers(0, len(POSITIONS), size=num_images)
    color_names = list(COLORS)
    return [Sample(SHAPES[s], color_names[c], SIZES[z], POSITIONS[p]) for s, c, z, p in zip(shapes, colors, sizes, positions)]


def generate_domain(domain: str, num_images: int, captions_per_image: int = 1, image_size: int = 32, seed: int = 0) -> dict[str, list]:
    """Columns of a domain: image (PIL), caption (list[str]), image_id (str), label (shape name)."""
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    rng = np.random.default_rng([seed, 0 if domain == "source" else 1])
    samples = sample_concepts(domain, num_images, rng)
    columns: dict[str, list] = {"image": [], "caption": [], "image_id": [], "label": []}
    for index, sample in enumerate(samples):
        first = int(rng.integers(0, 3))
        columns["image"].append(render(sample, domain, image_size, rng))
        columns["caption"].append([sample.caption(domain, first + k) for k in range(captions_per_image)])
        columns["image_id"].append(f"{domain}-{seed}-{index:06d}")
        columns["label"].append(sample.shape)
    return columns


def all_caption_text(seed: int = 0, per_domain: int = 2000) -> list[str]:
    """Every template and word of both domains, for training the demo tokenizer."""
    texts = []
    for domain in ("source", "target"):
        rng = np.random.default_rng([seed, 2])
        for sample in sample_concepts(domain, per_domain, rng):
            texts.extend(sample.caption(domain, t) for t in range(3))
    return texts
