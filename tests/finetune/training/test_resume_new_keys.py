"""A checkpoint written before a recipe section existed resumes when the section is left at its defaults."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from finetune.config.load import validate_config
from finetune.errors import ResumeError
from finetune.training.checkpoint import TrainerState, check_resumable

TREE = {
    "model": {"name_or_path": "openai/clip-vit-base-patch16"},
    "data": {
        "train": {"synthetic": {"domain": "target", "num_images": 8}},
        "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8, "seed": 1}}},
    },
    "train": {"max_steps": 10},
}


def resolved(tree: dict) -> dict:
    return validate_config(copy.deepcopy(tree)).model_dump(mode="json")


def test_a_config_from_before_the_augment_section_resumes_with_augmentation_off():
    old = resolved(TREE)
    del old["augment"]  # as written before the section existed
    state = TrainerState(num_processes=1, config=old)
    check_resumable(state, Path("ckpt"), resolved(TREE), num_processes=1)  # no error


def test_turning_augmentation_on_for_a_resume_is_refused_naming_the_key():
    old = resolved(TREE)
    del old["augment"]
    state = TrainerState(num_processes=1, config=old)
    now = resolved({**TREE, "augment": {"image": {"horizontal_flip": {"enabled": True}}}})
    with pytest.raises(ResumeError, match=r"augment\.image\.horizontal_flip\.enabled: False -> True"):
        check_resumable(state, Path("ckpt"), now, num_processes=1)
