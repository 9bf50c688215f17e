"""Recipe keys of a text-tower swap: model.text_tower, distill.*, data.eval.languages, synthetic languages."""

from __future__ import annotations

import copy

import pytest

from finetune.config.load import validate_config
from finetune.errors import ConfigError

SWAP = {
    "model": {"name_or_path": "openai/clip-vit-base-patch32", "text_tower": "xlm-roberta-base"},
    "distill": {"data": {"synthetic": {"num_samples": 100}}, "max_steps": 10},
    "data": {
        "train": {"synthetic": {"domain": "source", "num_images": 8, "languages": ["en", "zh"]}},
        "eval": {
            "languages": {
                "en": {"synthetic": {"domain": "source", "num_images": 8, "seed": 1}},
                "zh": {"synthetic": {"domain": "source", "num_images": 8, "seed": 1, "languages": ["zh"]}},
            }
        },
    },
    "train": {"max_steps": 10},
}


def problems(tree) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(tree)
    return info.value.problems


def test_a_text_tower_swap_recipe_resolves():
    cfg = validate_config(copy.deepcopy(SWAP))
    assert cfg.data.eval.target is None and list(cfg.data.eval.languages) == ["en", "zh"]
    assert cfg.distill.data.text_columns == ["de", "es", "zh"] and cfg.distill.text_training == "full"
    assert cfg.data.train.synthetic.languages == ["en", "zh"]


def test_every_swap_problem_is_reported_at_once_with_its_key():
    tree = copy.deepcopy(SWAP)
    del tree["model"]["text_tower"]
    tree["distill"]["mse_weight"] = 0
    tree["data"]["train"]["synthetic"].update(domain="target")
    tree["data"]["eval"]["languages"]["zh"]["synthetic"]["languages"] = ["fr"]
    assert problems(tree) == [
        "data.train.synthetic: languages ['en', 'zh'] need domain: source (the only domain with translations)",
        "data.eval.languages.zh.synthetic: languages: ['fr'] not among the synthetic languages ['en', 'de', 'es', 'zh']",
        "distill.mse_weight and distill.cosine_weight are both 0: nothing to learn",
    ]
    tree = copy.deepcopy(SWAP)
    tree["data"]["eval"]["languages"]["target"] = tree["data"]["eval"]["languages"]["en"]
    assert problems(tree) == ["data.eval.languages: ['target'] are names of the other eval sets; use ISO codes"]


def test_distill_needs_a_text_tower_and_eval_needs_a_set():
    tree = copy.deepcopy(SWAP)
    del tree["model"]["text_tower"]
    assert any("distill needs model.text_tower" in p for p in problems(tree))
    tree = copy.deepcopy(SWAP)
    tree["data"]["eval"] = {}
    assert any("set data.eval.target or data.eval.languages" in p for p in problems(tree))
    tree = copy.deepcopy(SWAP)
    tree["distill"]["data"]["synthetic"]["languages"] = ["de", "zh"]
    assert any("languages must include en" in p for p in problems(tree))
    tree["distill"]["data"]["synthetic"]["languages"] = ["en"]
    tree["distill"]["data"]["path"] = "some/parallel-text"
    assert any("set exactly one of `path`" in p for p in problems(tree))
