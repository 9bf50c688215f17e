"""The augment: section: off by default, every bound checked with its dotted path, cross-field rules name both keys."""

from __future__ import annotations

import copy
import warnings

import pytest
import yaml

from finetune.config.load import load_config, load_resolved_config, save_config
from finetune.errors import ConfigError

MINIMAL = {
    "model": {"name_or_path": "openai/clip-vit-base-patch16"},
    "data": {
        "train": {"synthetic": {"domain": "target", "num_images": 8}},
        "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8, "seed": 1}}},
    },
    "train": {"max_steps": 10},
}


def problems(tmp_path, augment: dict, **data_train) -> list[str]:
    tree = copy.deepcopy(MINIMAL)
    tree["augment"] = augment
    tree["data"]["train"].update(data_train)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_augmentation_is_off_by_default(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path)
    assert not cfg.augment.image_enabled() and not cfg.augment.text_enabled()


def test_every_bound_is_reported_at_once_with_its_dotted_path(tmp_path):
    found = problems(
        tmp_path,
        {
            "image": {
                "random_resized_crop": {"enabled": True, "scale": [0.0, 1.0], "ratio": [1.5, 0.5]},
                "horizontal_flip": {"enabled": True, "p": 1.2},
                "rotation": {"enabled": True, "degrees": 60},
                "color_jitter": {"enabled": True, "brightness": 1.5, "hue": 0.6, "p": -0.1},
            },
            "text": {"word_dropout": 0.5, "word_swap": 2, "caption_templates": ["no placeholder"]},
        },
    )
    expected = [
        "augment.image.random_resized_crop.scale: scale must lie within (0, 1], got [0.0, 1.0]",
        "augment.image.random_resized_crop.ratio: ratio must be ordered [low, high], got [1.5, 0.5]",
        "augment.image.horizontal_flip.p: Input should be less than or equal to 1, got 1.2",
        "augment.image.rotation.degrees: Input should be less than or equal to 45, got 60",
        "augment.image.color_jitter.p: Input should be greater than or equal to 0, got -0.1",
        "augment.image.color_jitter.brightness: Input should be less than or equal to 1, got 1.5",
        "augment.image.color_jitter.hue: Input should be less than or equal to 0.5, got 0.6",
        "augment.text.word_dropout: Input should be less than 0.5, got 0.5",
        "augment.text.word_swap: Input should be less than or equal to 1, got 2",
        "augment.text.caption_templates: template 0 ('no placeholder') needs exactly one {caption} placeholder",
    ]
    assert sorted(found) == sorted(expected)


def test_crop_scale_above_one_names_the_key(tmp_path):
    found = problems(tmp_path, {"image": {"random_resized_crop": {"enabled": True, "scale": [0.5, 1.2]}}})
    assert found == ["augment.image.random_resized_crop.scale: scale must lie within (0, 1], got [0.5, 1.2]"]


def test_a_typo_gets_a_did_you_mean(tmp_path):
    found = problems(tmp_path, {"image": {"horizontal_flips": {"enabled": True}}})
    assert found == ["augment.image.horizontal_flips: unknown key; did you mean 'augment.image.horizontal_flip'?"]


def test_caption_templates_on_a_label_only_set_name_both_keys(tmp_path):
    found = problems(
        tmp_path,
        {"text": {"caption_templates": ["{caption}", "a scan: {caption}"]}},
        caption_column=None,
        label_column="label",
        caption_templates=["a {label}"],
    )
    assert len(found) == 1
    assert "augment.text.caption_templates" in found[0] and "data.train.caption_column is null" in found[0]


def test_settings_of_a_switched_off_transform_warn(tmp_path):
    tree = copy.deepcopy(MINIMAL)
    tree["augment"] = {"image": {"rotation": {"enabled": False, "degrees": 5}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.warns(UserWarning, match=r"^augment\.image\.rotation\.enabled is false: augment\.image\.rotation\.degrees ignored$"):
        load_config(path)


def test_a_resolved_config_reloads_without_warnings(tmp_path):
    path = tmp_path / "r.yaml"
    tree = copy.deepcopy(MINIMAL)
    tree["augment"] = {"image": {"horizontal_flip": {"enabled": True, "p": 0.3}}, "text": {"word_dropout": 0.1}}
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_resolved_config(tmp_path / "out" / "config.yaml")
    assert again == cfg and again.augment.image.horizontal_flip.p == 0.3
