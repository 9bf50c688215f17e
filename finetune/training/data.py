"""The training data as the loop sees it: data.train plus any replay sets, class ids, the sampler and
the class weights, each built from the recipe by a thin builder that hands plain arguments to
data_tools (`ClassPowerSampler(labels, power, ...)`, `class_weights(labels, method, beta)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from data_tools.augment import (
    AugmentedRows,
    ImageAugmentation,
    PositionKeys,
    TextAugmentation,
)
from data_tools.class_weights import class_weights
from data_tools.mixing import class_vocabulary, concatenate_training_sets
from data_tools.sampling import (
    ClassPowerSampler,
    EpochSampler,
    EpochShuffleSampler,
    MixtureSampler,
    RepeatFactorSampler,
    class_counts,
)
from data_tools.templates import EpochCaptions
from finetune.config.schema import RecipeConfig


@dataclass
class TrainingSet:
    """data.train's rows first, then each replay set's; `labels` are data.train's (None without a label column)."""

    pairs: datasets.Dataset
    num_primary: int  # rows of data.train
    replay_parts: list[tuple[int, int, float]]  # (offset, rows, fraction) per data.replay entry
    labels: list[str] | None  # (num_primary,)
    vocabulary: list[str] | None  # class id -> label

    def __len__(self) -> int:
        return len(self.pairs)

    def class_counts(self) -> dict[str, int] | None:
        """Training pairs per class of data.train (what head / medium / tail are measured against)."""
        return class_counts(self.labels) if self.labels is not None else None


def build_training_set(cfg: RecipeConfig, primary: datasets.Dataset, replay: list[datasets.Dataset]) -> TrainingSet:
    labels = [str(v) for v in primary["label"]] if "label" in primary.column_names else None
    vocabulary = class_vocabulary(labels) if labels is not None else None
    try:
        pairs, ranges = concatenate_training_sets(primary, replay, vocabulary)
    except ValueError as exc:
        from finetune.errors import DataLoadError

        raise DataLoadError(str(exc)) from None
    parts = [(offset, size, spec.fraction) for (offset, size), spec in zip(ranges, cfg.data.replay)]
    return TrainingSet(pairs=pairs, num_primary=len(primary), replay_parts=parts, labels=labels, vocabulary=vocabulary)


def build_sampler(cfg: RecipeConfig, train: TrainingSet) -> EpochSampler:
    """The recipe's `sampling:` over data.train, mixed with the replay sets by fraction."""
    s, seed = cfg.sampling, cfg.train.seed
    if s.kind == "uniform":
        sampler: EpochSampler = EpochShuffleSampler(train.num_primary, seed)
    elif s.kind == "repeat_factor":
        sampler = RepeatFactorSampler(train.labels, s.repeat_threshold, seed)
    else:
        power = 0.0 if s.kind == "class_balanced" else s.power
        sampler = ClassPowerSampler(train.labels, power, train.num_primary, seed)
    if train.replay_parts:
        sampler = MixtureSampler(sampler, train.replay_parts, seed)
    return sampler


def build_class_weights(cfg: RecipeConfig, train: TrainingSet) -> torch.Tensor | None:
    """(C,) weight per class id, or None for loss.class_weights=none."""
    if cfg.loss.class_weights == "none":
        return None
    weights = class_weights(train.labels, cfg.loss.class_weights, cfg.loss.class_weight_beta)
    return torch.tensor([weights[c] for c in train.vocabulary], dtype=torch.float32)


def training_dataset(cfg: RecipeConfig, train: TrainingSet):
    """What the DataLoader indexes: the pairs, with label-only rows drawing a template per epoch."""
    if "caption_choices" in train.pairs.column_names:
        return EpochCaptions(train.pairs, cfg.train.seed)
    return train.pairs


def build_augmentation(cfg: RecipeConfig) -> tuple[ImageAugmentation | None, TextAugmentation | None]:
    """The recipe's `augment:` as plain settings; None for a side that is off (the loader is then untouched)."""
    a = cfg.augment
    i, t = a.image, a.text
    image = ImageAugmentation(
        crop=i.random_resized_crop.enabled,
        crop_scale=tuple(i.random_resized_crop.scale),
        crop_ratio=tuple(i.random_resized_crop.ratio),
        flip=i.horizontal_flip.enabled,
        flip_p=i.horizontal_flip.p,
        rotation=i.rotation.enabled,
        rotation_degrees=i.rotation.degrees,
        rotation_padding=i.rotation.padding,
        jitter=i.color_jitter.enabled,
        jitter_p=i.color_jitter.p,
        brightness=i.color_jitter.brightness,
        contrast=i.color_jitter.contrast,
        saturation=i.color_jitter.saturation,
        hue=i.color_jitter.hue,
    )
    text = TextAugmentation(
        word_dropout=t.word_dropout,
        word_swap=t.word_swap,
        caption_templates=tuple(t.caption_templates) if t.caption_templates else None,
    )
    return (image if image.enabled else None), (text if text.enabled else None)


def augmented_loader_parts(dataset, sampler: EpochSampler, seed: int, text: TextAugmentation | None):
    """(dataset, sampler) for the DataLoader with augmentation on: indices become (epoch, position, row), so
    every sample's augmentation is keyed by its place in the epoch (not by worker RNG), and rows carry it."""
    off = TextAugmentation(word_dropout=0.0, word_swap=0.0, caption_templates=None)
    return AugmentedRows(dataset, seed, text or off), PositionKeys(sampler)
