"""The data pipeline: the pre-resized cache gives the processor's tensors exactly, JPEG draft decoding
stays within a few levels of a full decode at the model's size, workers follow the machine."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from data_tools import collate
from data_tools.loading import decode_image
from data_tools.pipeline import (
    cache_preprocessed_images,
    default_num_workers,
    processor_target_size,
)


def preprocess_images(image_processor, images):
    """The training collator's preprocessing, given just the image processor."""
    return collate.preprocess_images(type("Processor", (), {"image_processor": image_processor}), images)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth structure plus sensor-like noise: what JPEG photos look like to a decoder."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=92) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})


def to_pixels(tensor: torch.Tensor, processor) -> torch.Tensor:
    """Normalised tensors back in [0, 1] pixel units, to compare in levels of 1/255."""
    return tensor * torch.tensor(processor.image_std)[:, None, None]


def test_the_preresized_cache_gives_the_processors_tensors(processor):
    images = [photo_like(200, 150, 0), photo_like(90, 260, 1), photo_like(64, 64, 2)]
    values = [encoded(images[0], "JPEG"), encoded(images[1], "PNG"), encoded(images[2], "PNG"), {"bytes": b"broken", "path": None}]
    pairs = datasets.Dataset.from_dict(
        {"image": values, "caption": ["a", "b", "c", "d"]},
        features=datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string")}),
    )
    cached = cache_preprocessed_images(pairs, processor)
    assert cached["caption"] == pairs["caption"]
    assert cached[3]["image"]["bytes"] == b"broken"  # still unreadable: the collator skips and counts it
    for i in range(3):
        small = decode_image(cached[i]["image"])
        assert small.size == (64, 64)
        reference = preprocess_images(processor, [decode_image(values[i])])
        fast = preprocess_images(processor, [small])
        assert (to_pixels(fast - reference, processor).abs().max() * 255).item() <= 1.0 + 1e-4  # within 1/255
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)  # in fact exact: same code, same uint8s


def test_jpeg_draft_decoding_stays_close_to_a_full_decode(processor):
    image = photo_like(640, 480, 3)
    value = encoded(image, "JPEG")
    size = processor_target_size(processor)
    draft = decode_image(value, draft_size=size)
    assert min(draft.size) >= size and draft.size[0] < 640  # decoded at a reduced scale that still covers the size
    reference = preprocess_images(processor, [decode_image(value)])
    fast = preprocess_images(processor, [draft])
    levels = to_pixels(fast - reference, processor).abs() * 255
    assert levels.mean().item() <= 1.0  # within 1/255 on average
    assert levels.max().item() <= 6.0  # and a few levels at worst (DCT scaling vs a bicubic resize)
    png = encoded(image, "PNG")
    assert decode_image(png, draft_size=size).size == (640, 480)  # only JPEG has a draft mode


def test_default_workers_follow_the_machine():
    assert default_num_workers(cores=2, local_processes=1) == 1
    assert default_num_workers(cores=16, local_processes=1) == 8  # capped
    assert default_num_workers(cores=16, local_processes=4) == 3
    assert default_num_workers(cores=2, local_processes=2) == 1  # never 0: decoding overlaps the step
