"""Keeping the model fed: how many loader workers, JPEG decoding that skips work, and a cache of
images already resized to the processor's size.

    num_workers = default_num_workers(cores, local_processes)
    decode_image(value, draft_size=224)         # JPEG: the decoder scales down by 1/2, 1/4, 1/8 itself
    pairs = cache_preprocessed_images(pairs, image_processor)   # decode + resize + crop once

Measured in `scripts/benchmark.py` (the `data_pipeline` entry) against the model's training images/s.
"""

from __future__ import annotations

import io

import datasets
import numpy as np
from PIL import Image

from data_tools.loading import decode_image


def default_num_workers(cores: int, local_processes: int, *, cap: int = 8) -> int:
    """Loader workers per process: the cores left per process after the one the training loop uses,
    at least 1 (decoding then overlaps the model's step), at most `cap`."""
    return max(1, min(cap, cores // max(1, local_processes) - 1))


def processor_target_size(image_processor) -> int:
    """The side the processor resizes to (shortest edge or height): the size a JPEG draft must reach."""
    size = image_processor.size
    return int(size.get("shortest_edge") or size.get("height") or min(size.values()))


def preprocessed_image(image: Image.Image, image_processor) -> Image.Image:
    """`image` resized and cropped by the processor's own code, as uint8 RGB: feeding it back through
    the processor resizes and crops nothing (same size), so the tensors equal the original's."""
    pixels = image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8).transpose(1, 2, 0))  # (H, W, 3)


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; fast to write and to read back
    return {"bytes": buffer.getvalue(), "path": None}


def cache_preprocessed_images(pairs: datasets.Dataset, image_processor, *, num_proc: int | None = None) -> datasets.Dataset:
    """Every distinct image decoded, resized and cropped once, stored with `datasets` (PNG: lossless).

    Rows whose image cannot be read keep their original value, so the collator still skips and counts
    them. Datasets loaded from files get the result cached on disk beside them: a second run with
    the same data and processor reuses it.
    """

    def resize(batch):
        out = []
        for value in batch["image"]:
            image = decode_image(value)
            out.append(value if image is None else _png(preprocessed_image(image, image_processor)))
        return {"image": out}

    features = pairs.features.copy()
    features["image"] = datasets.Image(decode=False)
    return pairs.cast(features).map(
        resize,
        batched=True,
        batch_size=64,
        features=features,
        num_proc=num_proc,
        desc=f"data.cache_preprocessed: resizing images to {processor_target_size(image_processor)} px once",
    )
