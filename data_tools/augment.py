"""Training-time augmentation of images and captions: pure functions of plain arguments, deterministic
under the seed.

    keys = PositionKeys(sampler)                  # the sampler yields (epoch, position, row)
    rows = AugmentedRows(dataset, seed, text)     # rows carry their key; captions augmented here
    pixels = augment_images(pixels, keys, seed, image)   # in the collator, before normalisation

Image transforms (each switched on and bounded separately, applied in this order): random resized
crop, horizontal flip, small rotation, colour jitter. They run on the image processor's output
(resized and centre-cropped to the model's input size, rescaled to [0, 1]) **before** its mean/std
normalisation, one image at a time. Working on those tensors rather than on the decoded original
means that `data.cache_preprocessed` (which stores the resized, centre-cropped image, i.e. the
pre-augmentation pixels) and a plain run produce the same augmented tensors, and that the crop is
measured in the model's input frame whatever the original's size. The price: a crop is taken from
the centre-cropped input and resized back up, so a scale-0.8 crop loses a little resolution (about
11% linear), where torchvision's RandomResizedCrop would crop the full-resolution original.

Library: kornia (0.9) for rotation and the HSV-based saturation / hue shifts. It works on the float
tensors the processor already produced, needs no torchvision (which this project does not install:
torch is pinned alone), and is a maintained, tested implementation of the geometry and colour maths.
Its random `augmentation` modules are not used: they draw from torch's global RNG, which differs
between DataLoader workers and is not part of a checkpoint. Parameters are drawn here instead, from
NumPy generators seeded with (train.seed, epoch, position in the epoch, transform), so:

- the same seed gives the same augmented pixels, a different epoch different ones;
- the result does not depend on `data.num_workers` (the key travels with the sample index, not with
  the worker), nor on how many processes share the batch (positions are global);
- a resumed run replays the interrupted epoch's positions, so it sees the pixels an uninterrupted
  run would have seen; nothing augmentation-related needs to be checkpointed;
- a row drawn twice in one epoch (class-balanced, repeat-factor or replay sampling) is augmented
  differently each time, because the key is its position, not its row.

Each transform has its own generator stream, so switching one on does not change another's draws.

Text: word dropout (each word dropped with probability p, at least one word kept), one swap of two
adjacent words with probability p, and caption templates with a `{caption}` placeholder (one drawn
per sample per epoch). Label-only sets already draw a class template per sample per epoch
(data_tools/templates.py); these templates wrap captions that exist.

Evaluation never augments: only the training loader is built with these pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

# Generator streams: one per transform, so the draws of one never depend on which others are on.
_CROP, _FLIP, _ROTATION, _JITTER, _TEXT = range(5)


# ----------------------------------------------------------------------------- plain settings


@dataclass(frozen=True)
class ImageAugmentation:
    """Bounds of every image transform; a transform whose switch is False is never applied."""

    crop: bool
    crop_scale: tuple[float, float]  # area fraction of the input kept, (0, 1]
    crop_ratio: tuple[float, float]  # width / height of the crop
    flip: bool
    flip_p: float
    rotation: bool
    rotation_degrees: float  # angle uniform in [-degrees, degrees]
    rotation_padding: str  # kornia padding_mode: zeros | border | reflection
    jitter: bool
    jitter_p: float
    brightness: float  # factor uniform in [1 - b, 1 + b]
    contrast: float
    saturation: float
    hue: float  # shift uniform in [-h, h] turns of the colour wheel

    @property
    def enabled(self) -> bool:
        return self.crop or self.flip or self.rotation or self.jitter


@dataclass(frozen=True)
class TextAugmentation:
    word_dropout: float  # probability each word is dropped (one word always survives)
    word_swap: float  # probability one random pair of adjacent words is swapped
    caption_templates: tuple[str, ...] | None  # each with {caption}

    @property
    def enabled(self) -> bool:
        return self.word_dropout > 0 or self.word_swap > 0 or bool(self.caption_templates)


@dataclass(frozen=True)
class ImageParams:
    """The drawn parameters of one sample: what `apply_image_params` does to it."""

    crop_box: tuple[int, int, int, int] | None  # (top, left, height, width) in pixels; None = no crop
    flip: bool
    angle: float  # degrees, counter-clockwise; 0 = no rotation
    jitter: tuple[tuple[str, float], ...]  # (("brightness", 1.1), ("hue", -0.02), ...) in application order


def sample_generator(seed: int, epoch: int, position: int, stream: int) -> np.random.Generator:
    """The only randomness of one sample's augmentation: a function of (seed, epoch, position, stream)."""
    return np.random.default_rng([seed, epoch, position, stream])


# ----------------------------------------------------------------------------- drawing parameters


def draw_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator):
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect `ratio` (torchvision's
    RandomResizedCrop rule: 10 tries, then the whole image clipped to the ratio range, centred)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_image_params(height: int, width: int, aug: ImageAugmentation, seed: int, epoch: int, position: int) -> ImageParams:
    """Every random choice for one sample, each transform from its own stream."""
    crop_box = None
    if aug.crop:
        crop_box = draw_crop_box(height, width, aug.crop_scale, aug.crop_ratio, sample_generator(seed, epoch, position, _CROP))
    flip = aug.flip and bool(sample_generator(seed, epoch, position, _FLIP).random() < aug.flip_p)
    angle = 0.0
    if aug.rotation and aug.rotation_degrees > 0:
        angle = float(sample_generator(seed, epoch, position, _ROTATION).uniform(-aug.rotation_degrees, aug.rotation_degrees))
    jitter: tuple = ()
    if aug.jitter:
        rng = sample_generator(seed, epoch, position, _JITTER)
        if rng.random() < aug.jitter_p:
            factors = [
                ("brightness", float(rng.uniform(1 - aug.brightness, 1 + aug.brightness))),
                ("contrast", float(rng.uniform(1 - aug.contrast, 1 + aug.contrast))),
                ("saturation", float(rng.uniform(1 - aug.saturation, 1 + aug.saturation))),
                ("hue", float(rng.uniform(-aug.hue, aug.hue))),
            ]
            order = rng.permutation(len(factors))  # torchvision's ColorJitter also shuffles the order
            jitter = tuple(factors[i] for i in order)
    return ImageParams(crop_box=crop_box, flip=flip, angle=angle, jitter=jitter)


# ----------------------------------------------------------------------------- applying them


def import_kernels() -> None:
    """Import kornia in the main process before DataLoader workers start: forked workers then inherit it
    instead of each paying the import (seconds) again on its first augmented batch, and again each epoch
    when workers are not persistent. Not at module level: runs without augmentation never pay it."""
    import kornia.enhance  # noqa: F401
    import kornia.geometry.transform  # noqa: F401


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """(3, H, W) -> the box's pixels resized back to (3, H, W); the whole image comes back untouched."""
    _, height, width = image.shape
    top, left, h, w = box
    if (h, w) == (height, width):
        return image
    crop = image[:, top : top + h, left : left + w]  # (3, h, w)
    return F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False, antialias=h > height or w > width)[0]


def rotate(image: torch.Tensor, degrees: float, padding: str) -> torch.Tensor:
    """(3, H, W) rotated about its centre, corners filled by `padding`; 0 degrees returns it untouched."""
    if degrees == 0:
        return image
    from kornia.geometry.transform import rotate as kornia_rotate

    angle = torch.tensor([degrees], dtype=image.dtype)
    return kornia_rotate(image[None], angle, padding_mode=padding, align_corners=False)[0]


def adjust_colour(image: torch.Tensor, kind: str, factor: float) -> torch.Tensor:
    """One colour-jitter step on (3, H, W) in [0, 1]; a neutral factor (1, or hue 0) returns it untouched."""
    import kornia.enhance as ke

    if (kind == "hue" and factor == 0) or (kind != "hue" and factor == 1):
        return image
    if kind == "brightness":  # multiplicative, as torchvision (kornia's adjust_brightness adds)
        return (image * factor).clamp(0, 1)
    if kind == "contrast":  # blend with the mean grey level
        return ke.adjust_contrast_with_mean_subtraction(image[None], factor)[0].clamp(0, 1)
    if kind == "saturation":  # blend with the greyscale image
        return ke.adjust_saturation_with_gray_subtraction(image[None], factor)[0].clamp(0, 1)
    if kind == "hue":  # shift in HSV; kornia takes radians
        return ke.adjust_hue(image[None], factor * 2 * math.pi)[0].clamp(0, 1)
    raise ValueError(f"unknown colour adjustment {kind!r}")


def apply_image_params(image: torch.Tensor, params: ImageParams, rotation_padding: str) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, H, W) in [0, 1]: crop, flip, rotation, colour, as drawn."""
    if params.crop_box is not None:
        image = resized_crop(image, params.crop_box)
    if params.flip:
        image = image.flip(-1)
    image = rotate(image, params.angle, rotation_padding)
    for kind, factor in params.jitter:
        image = adjust_colour(image, kind, factor)
    return image


def augment_image(image: torch.Tensor, aug: ImageAugmentation, seed: int, epoch: int, position: int) -> torch.Tensor:
    """One sample: (3, H, W) in [0, 1], before normalisation -> augmented (3, H, W)."""
    params = draw_image_params(image.shape[-2], image.shape[-1], aug, seed, epoch, position)
    return apply_image_params(image, params, aug.rotation_padding)


def augment_images(pixels: torch.Tensor, keys: list[tuple[int, int]], seed: int, aug: ImageAugmentation) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] with one (epoch, position) key per row -> (B, 3, H, W)."""
    return torch.stack([augment_image(image, aug, seed, epoch, position) for image, (epoch, position) in zip(pixels, keys)])


# ----------------------------------------------------------------------------- text


def drop_words(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each word dropped with probability p; when all would go, one (drawn) survives."""
    if p <= 0 or not words:
        return words
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def swap_adjacent_words(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """With probability p, one random pair of neighbouring words trades places."""
    if p <= 0 or len(words) < 2 or rng.random() >= p:
        return words
    i = int(rng.integers(len(words) - 1))
    return [*words[:i], words[i + 1], words[i], *words[i + 2 :]]


def augment_caption(caption: str, aug: TextAugmentation, rng: np.random.Generator) -> str:
    """Dropout, then a swap, on the caption's words; then a template drawn around it. Off: unchanged."""
    if not aug.enabled:
        return caption
    words = caption.split()
    if aug.word_dropout > 0 or aug.word_swap > 0:
        words = swap_adjacent_words(drop_words(words, aug.word_dropout, rng), aug.word_swap, rng)
        caption = " ".join(words)
    if aug.caption_templates:
        template = aug.caption_templates[int(rng.integers(len(aug.caption_templates)))]
        caption = template.replace("{caption}", caption)
    return caption


# ----------------------------------------------------------------------------- loader pieces


class PositionKeys(Sampler):
    """Wraps an epoch sampler: yields (epoch, position, row) instead of row, so each sample's augmentation
    is keyed by its place in the epoch's order. `epoch` reads and writes the wrapped sampler's (the loop
    assigns it; no `set_epoch`, see data_tools/sampling.py)."""

    def __init__(self, sampler):
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.sampler.epoch = value

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, position, int(row)) for position, row in enumerate(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


class AugmentedRows(Dataset):
    """Indexed by PositionKeys' (epoch, position, row): the row, its caption augmented, its key kept in
    `augment_key` for the collator's image augmentation. `epoch` passes through to the rows underneath
    (label-only rows draw their template per epoch); absent when they have none."""

    def __init__(self, rows, seed: int, text: TextAugmentation):
        self.rows, self.seed, self.text = rows, seed, text

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def epoch(self) -> int:
        return self.rows.epoch  # AttributeError (so hasattr is False) when the rows have no epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.rows.epoch = value

    def __getitem__(self, key) -> dict:
        epoch, position, row_index = key
        row = dict(self.rows[int(row_index)])
        if self.text.enabled:
            row["caption"] = augment_caption(row["caption"], self.text, sample_generator(self.seed, epoch, position, _TEXT))
        row["augment_key"] = (int(epoch), int(position))
        return row
