"""Augmentation: each transform bounded and exact where it should be the identity, deterministic in
(seed, epoch, position), independent of loader workers and of a resume, text changes only when on."""

from __future__ import annotations

import dataclasses
import io

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import skip_first_batches
from PIL import Image
from torch.utils.data import DataLoader
from transformers import CLIPProcessor

from data_tools.augment import (
    AugmentedRows,
    ImageAugmentation,
    PositionKeys,
    TextAugmentation,
    augment_caption,
    augment_image,
    draw_crop_box,
    draw_image_params,
    drop_words,
    sample_generator,
    swap_adjacent_words,
)
from data_tools.collate import ImageTextCollator
from data_tools.sampling import EpochShuffleSampler

OFF = ImageAugmentation(
    crop=False,
    crop_scale=(0.8, 1.0),
    crop_ratio=(0.75, 4 / 3),
    flip=False,
    flip_p=0.5,
    rotation=False,
    rotation_degrees=10.0,
    rotation_padding="border",
    jitter=False,
    jitter_p=0.8,
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    hue=0.0,
)
ALL_ON = dataclasses.replace(OFF, crop=True, flip=True, rotation=True, jitter=True, hue=0.05)
TEXT_OFF = TextAugmentation(word_dropout=0.0, word_swap=0.0, caption_templates=None)


def image(seed: int = 0, size: int = 24) -> torch.Tensor:
    """(3, H, W) in [0, 1] with structure in both axes, so flips and crops show."""
    return torch.from_numpy(np.random.default_rng(seed).random((3, size, size), dtype=np.float32))


# ----------------------------------------------------------------------------- each transform, bounded


def test_flip_with_p_1_equals_numpy_fliplr():
    x = image()
    out = augment_image(x, dataclasses.replace(OFF, flip=True, flip_p=1.0), seed=0, epoch=0, position=0)
    expected = np.fliplr(x.permute(1, 2, 0).numpy()).transpose(2, 0, 1)  # (H, W, 3) mirrored left-right
    assert np.array_equal(out.numpy(), expected)


def test_flip_with_p_0_never_flips():
    x = image()
    for position in range(20):
        assert torch.equal(augment_image(x, dataclasses.replace(OFF, flip=True, flip_p=0.0), 0, 0, position), x)


def test_identity_settings_are_exactly_the_identity():
    x = image()
    identity = dataclasses.replace(
        OFF,
        crop=True,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        rotation=True,
        rotation_degrees=0.0,
        jitter=True,
        jitter_p=1.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
    )
    for position in range(5):
        assert torch.equal(augment_image(x, identity, seed=3, epoch=1, position=position), x)
    assert torch.equal(augment_image(x, OFF, 0, 0, 0), x)  # everything off


def test_crop_boxes_stay_inside_the_image_and_within_the_scale_and_ratio_bounds():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = draw_crop_box(48, 48, (0.3, 0.9), (0.75, 4 / 3), rng)
        assert 0 <= top and 0 <= left and top + h <= 48 and left + w <= 48
        assert 0.3 * 48 * 48 * 0.9 <= h * w <= 0.9 * 48 * 48 * 1.1  # rounding to whole pixels
        assert 0.75 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_rotation_angle_and_jitter_factors_stay_within_bounds():
    aug = dataclasses.replace(
        OFF, rotation=True, rotation_degrees=7.0, jitter=True, jitter_p=1.0, brightness=0.3, contrast=0.1, saturation=0.5, hue=0.02
    )
    for position in range(200):
        p = draw_image_params(32, 32, aug, seed=0, epoch=0, position=position)
        assert -7.0 <= p.angle <= 7.0
        factors = dict(p.jitter)
        assert 0.7 <= factors["brightness"] <= 1.3 and 0.9 <= factors["contrast"] <= 1.1
        assert 0.5 <= factors["saturation"] <= 1.5 and -0.02 <= factors["hue"] <= 0.02


def test_augmented_pixels_stay_in_unit_range_and_change():
    x = image()
    out = augment_image(x, ALL_ON, seed=0, epoch=0, position=1)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_same_key_same_pixels_other_epoch_or_position_or_seed_differs():
    x = image()
    a = augment_image(x, ALL_ON, seed=0, epoch=2, position=5)
    assert torch.equal(a, augment_image(x, ALL_ON, seed=0, epoch=2, position=5))
    assert not torch.equal(a, augment_image(x, ALL_ON, seed=0, epoch=3, position=5))
    assert not torch.equal(a, augment_image(x, ALL_ON, seed=0, epoch=2, position=6))
    assert not torch.equal(a, augment_image(x, ALL_ON, seed=1, epoch=2, position=5))


def test_switching_one_transform_on_leaves_the_others_draws_alone():
    crop_only = dataclasses.replace(OFF, crop=True)
    crop_and_jitter = dataclasses.replace(OFF, crop=True, jitter=True)
    for position in range(10):
        assert (
            draw_image_params(32, 32, crop_only, 0, 0, position).crop_box
            == draw_image_params(32, 32, crop_and_jitter, 0, 0, position).crop_box
        )


# ----------------------------------------------------------------------------- text


def test_word_dropout_keeps_at_least_one_word():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        for words in (["one"], ["two", "words"], "a b c d e f".split()):
            kept = drop_words(words, 0.49, rng)
            assert 1 <= len(kept) <= len(words) and all(w in words for w in kept)


def test_word_dropout_drops_about_p_of_the_words():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(20)]
    kept = sum(len(drop_words(words, 0.25, rng)) for _ in range(500))
    assert kept / (500 * 20) == pytest.approx(0.75, abs=0.02)


def test_word_swap_trades_two_neighbours():
    words = "large round opacity upper left".split()
    swapped = swap_adjacent_words(words, 1.0, np.random.default_rng(0))
    assert sorted(swapped) == sorted(words) and swapped != words
    diff = [i for i, (a, b) in enumerate(zip(words, swapped)) if a != b]
    assert len(diff) == 2 and diff[1] == diff[0] + 1


def test_text_augmentation_off_never_changes_a_caption():
    for seed in range(50):
        caption = "  a  caption with   odd spacing "
        assert augment_caption(caption, TEXT_OFF, np.random.default_rng(seed)) == caption


def test_caption_templates_wrap_the_caption():
    aug = TextAugmentation(word_dropout=0.0, word_swap=0.0, caption_templates=("{caption}", "a radiograph: {caption}"))
    seen = {augment_caption("left lung {x}", aug, np.random.default_rng(seed)) for seed in range(40)}
    assert seen == {"left lung {x}", "a radiograph: left lung {x}"}  # braces in captions pass through


# ----------------------------------------------------------------------------- the loader: workers, resume


def png(seed: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def loader_parts(tiny_clip_dir):
    n = 24
    pairs = datasets.Dataset.from_dict(
        {
            "image": [png(i) for i in range(n)],
            "caption": [f"a red circle number {i} upper left" for i in range(n)],
            "image_index": list(range(n)),
            "source_row": list(range(n)),
            "image_id": [str(i) for i in range(n)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "caption": datasets.Value("string"),
                "image_index": datasets.Value("int64"),
                "source_row": datasets.Value("int64"),
                "image_id": datasets.Value("string"),
            }
        ),
    )
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    return pairs, processor


def augmented_loader(pairs, processor, num_workers: int, epoch: int = 0) -> DataLoader:
    text = TextAugmentation(word_dropout=0.3, word_swap=0.5, caption_templates=None)
    sampler = PositionKeys(EpochShuffleSampler(len(pairs), seed=7))
    sampler.epoch = epoch
    return DataLoader(
        AugmentedRows(pairs, 7, text),
        batch_size=4,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=ImageTextCollator(processor, 16, augment=ALL_ON, augment_seed=7),
    )


def test_augmented_batches_do_not_depend_on_the_number_of_workers(loader_parts):
    pairs, processor = loader_parts
    zero = list(augmented_loader(pairs, processor, num_workers=0))
    two = list(augmented_loader(pairs, processor, num_workers=2))
    assert len(zero) == len(two) == 6
    for a, b in zip(zero, two):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_a_resumed_epoch_sees_the_pixels_of_an_uninterrupted_one(loader_parts):
    pairs, processor = loader_parts
    full = list(augmented_loader(pairs, processor, num_workers=0, epoch=1))
    resumed = list(skip_first_batches(augmented_loader(pairs, processor, num_workers=0, epoch=1), 4))
    assert len(resumed) == 2
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_another_epoch_is_augmented_differently(loader_parts):
    pairs, processor = loader_parts
    by_row = {}
    for epoch in (0, 1):
        for batch in augmented_loader(pairs, processor, num_workers=0, epoch=epoch):
            for row, pixels in zip(batch["source_row"].tolist(), batch["pixel_values"]):
                by_row.setdefault(row, []).append(pixels)
    assert all(not torch.equal(a, b) for a, b in by_row.values())


def test_identity_augmentation_gives_the_plain_collators_tensors(loader_parts):
    """Rescale, (no-op) augmentation and the processor's normalisation done by hand equal the processor's own."""
    pairs, processor = loader_parts
    rows = [dict(pairs[i], augment_key=(0, i)) for i in range(4)]
    plain = ImageTextCollator(processor, 16)(rows)
    identity = dataclasses.replace(OFF, crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    augmented = ImageTextCollator(processor, 16, augment=identity, augment_seed=0)(rows)
    torch.testing.assert_close(augmented["pixel_values"], plain["pixel_values"], rtol=0, atol=1e-6)


def test_a_row_drawn_twice_in_an_epoch_is_augmented_twice_differently(loader_parts):
    pairs, processor = loader_parts
    rows = AugmentedRows(pairs, 0, TEXT_OFF)
    collate = ImageTextCollator(processor, 16, augment=ALL_ON, augment_seed=0)
    batch = collate([rows[(0, 3, 5)], rows[(0, 17, 5)]])  # the same row at two positions of epoch 0
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_sample_generator_is_a_function_of_its_key():
    assert sample_generator(1, 2, 3, 0).random() == sample_generator(1, 2, 3, 0).random()
    assert sample_generator(1, 2, 3, 0).random() != sample_generator(1, 2, 3, 1).random()


def test_a_processor_that_does_not_normalise_is_followed(loader_parts, tiny_clip_dir):
    _, processor = loader_parts
    pairs = loader_parts[0]
    raw = CLIPProcessor.from_pretrained(tiny_clip_dir)
    raw.image_processor.do_normalize = False
    rows = [dict(pairs[i], augment_key=(0, i)) for i in range(2)]
    identity = dataclasses.replace(OFF, flip=True, flip_p=0.0)
    plain = ImageTextCollator(raw, 16)(rows)["pixel_values"]
    augmented = ImageTextCollator(raw, 16, augment=identity, augment_seed=0)(rows)["pixel_values"]
    assert torch.equal(augmented, plain) and plain.min() >= 0 and plain.max() <= 1
